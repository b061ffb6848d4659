"""``SMTLanguageModel``: a LightningModule for any transformers causal LM, ready for the SMT callback.

It loads the model (a folder or a hub id, as transformers does: downloaded once into the Hugging Face cache,
cache only under ``HF_HUB_OFFLINE=1`` or ``local_files_only``; or a random model from a config dict, for
debugging), trains on response tokens only (the data module masks prompts), reports
validation loss, perplexity and token accuracy, evaluates with ``smt.eval`` in ``test``, and at the end
of fit writes the delta file and/or the merged model. ``smt_target()`` tells the callback to tune the
transformers model inside, so delta files carry the model's own module names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.text import Perplexity

from smt.adapters.merge import save_merged
from smt.core.merge import merged
from smt.core.model import DTYPES, get_bank
from smt.core.progress import local_slots_moved, refuse_all_zero_delta
from smt.core.quant import (
    OPTIMIZERS,
    QUANTIZATIONS,
    bnb_config,
    build_optimizer,
    make_loadable,
    quant_state_keys,
    quantize_linear_layers,
    require_bitsandbytes,
)
from smt.data.hub import from_pretrained
from smt.data.loss import IGNORE_INDEX, labelled_positions_loss
from smt.lightning.full_warmup import GROUP_FLAG
from smt.lightning.param_groups import param_groups
from smt.lightning.schedules import after_warmup, warmup_cosine

BUILTIN_TOKENIZERS = ("bytes",)


def load_causal_lm(
    name_or_path: str | None,
    model_config: dict | None,
    dtype: str,
    attn_implementation: str,
    quantization: str = "none",
    compute_dtype: str | None = None,
    double_quant: bool = True,
    local_files_only: bool = False,
):
    """A transformers causal LM from a folder or hub id (see ``smt.data.hub``), or a random one from a config.

    A quantized base (``nf4``/``fp4``/``int8``) loads through ``BitsAndBytesConfig``; a config-dict model has its
    Linear layers (all but ``lm_head``) quantized after construction, as transformers would.

    Raises:
        ValueError: neither or both sources given, the model is neither a folder nor loadable by id (offline: not
            cached), or bitsandbytes cannot run.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (name_or_path is None) == (model_config is None):
        raise ValueError("set exactly one of model.model (a folder or hub id) and model.model_config")
    compute = DTYPES[compute_dtype or dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if quantization != "none":
        require_bitsandbytes(quantization, device)
    if model_config is not None:
        config = AutoConfig.for_model(**model_config)
        config._attn_implementation = attn_implementation
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        if quantization != "none":
            quantize_linear_layers(model, quantization, compute, double_quant, "cpu")  # Lightning moves it later
        return model
    quantized = {}
    if quantization != "none":  # loads on one device; Lightning's later move does not touch the quantized bytes
        quantized = {"quantization_config": bnb_config(quantization, compute, double_quant), "device_map": device}
    model = from_pretrained(
        AutoModelForCausalLM.from_pretrained, name_or_path, "model.model", local_files_only,
        dtype=DTYPES[dtype], attn_implementation=attn_implementation, **quantized,
    )  # fmt: skip
    make_loadable(model)
    return model


def load_tokenizer_for(name_or_path: str | None, tokenizer: str | None, local_files_only: bool = False):
    """The tokenizer: ``bytes`` (a built-in byte-level one, no files), a folder/hub id, or the model's own."""
    from transformers import AutoTokenizer

    source = tokenizer or name_or_path
    if source == "bytes":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    if source is None:
        raise ValueError(
            "model.tokenizer is unset and the model has no folder to load one from; use 'bytes' or a folder"
        )
    return from_pretrained(AutoTokenizer.from_pretrained, source, "model.tokenizer", local_files_only)


class SMTLanguageModel(LightningModule):
    """Fine-tune a transformers causal LM (add the ``SparseMatrixTuning`` callback to tune blocks only).

    Args:
        model: a pretrained causal LM: a folder (``save_pretrained`` layout) or a Hugging Face hub id
            (``meta-llama/Meta-Llama-3-8B``), downloaded once into the usual cache (``HF_HOME``) as transformers does.
        model_config: instead of ``model``: a transformers config dict (with ``model_type``) for a random model.
        tokenizer: tokenizer folder/hub id; default: the model's. ``bytes`` = built-in byte tokenizer.
        dtype: weight dtype of the base model (``float32``, ``bfloat16``, ``float16``); for a quantized base, the
            dtype of the layers left unquantized (embeddings, norms, ``lm_head``).
        quantization: keep the base quantized with bitsandbytes: ``nf4``, ``fp4`` (4-bit, QLoRA-style), ``int8``
            (LLM.int8()), or ``none``. Only the blocks' Δ train (fp32 master copies, see ``smt.delta_dtype``).
        compute_dtype: compute dtype of 4-bit layers (``bnb_4bit_compute_dtype``); default: ``dtype``.
            ``bfloat16`` is what QLoRA uses on GPU (on CPUs without bf16 GEMM it is far slower).
        double_quant: also quantize the 4-bit scales (``bnb_4bit_use_double_quant``: ~0.4 bit/weight less).
        optimizer: ``adamw`` (torch), ``adamw8bit`` (bitsandbytes, 8-bit moments: ~2 bytes of state per tuned
            weight instead of 8) or ``paged_adamw8bit`` (CUDA only; elsewhere falls back to adamw8bit with a warning).
        attn_implementation: ``eager`` or ``sdpa``.
        gradient_checkpointing: recompute activations in backward (less memory, ~30 % more time).
        lr: peak learning rate.
        weight_decay: AdamW weight decay (it also pulls unused block deltas back to 0).
        betas: AdamW betas.
        scheduler: ``cosine``, ``linear`` or ``constant`` after the LR warm-up.
        lr_warmup_steps: linear LR warm-up steps (counted after the SMT warm-up).
        min_lr_ratio: final LR as a fraction of ``lr``.
        eval_mode: ``test`` scoring: ``likelihood`` (most likely label, fast) or ``generate`` (the papers' protocol).
        max_new_tokens: generation length in ``generate`` mode.
        results_path: JSON file for ``test`` results (per-task accuracy).
        delta_path: write the delta file here at the end of fit (bf16).
        merged_dir: write the merged model (``save_pretrained`` + tokenizer) here at the end of fit.
        slim_checkpoints: checkpoints keep only trainable parameters and the SMT bank; the frozen base is reloaded
            from ``model`` on resume (an 8B model's checkpoint shrinks from ~16 GB to the tuned blocks). Only when
            the base comes from ``model``: a random ``model_config`` base is always saved whole.
        local_files_only: read only folders and the Hugging Face cache, never download (``HF_HUB_OFFLINE=1`` does the
            same for every load, data sets included).
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        quantization: str = "none",
        compute_dtype: str | None = None,
        double_quant: bool = True,
        optimizer: str = "adamw",
        attn_implementation: str = "eager",
        gradient_checkpointing: bool = False,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: str = "cosine",
        lr_warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        eval_mode: str = "likelihood",
        max_new_tokens: int = 32,
        results_path: str | None = None,
        delta_path: str | None = None,
        merged_dir: str | None = None,
        slim_checkpoints: bool = True,
        local_files_only: bool = False,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"model.quantization={quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        if compute_dtype is not None and compute_dtype not in DTYPES:
            raise ValueError(f"model.compute_dtype={compute_dtype!r} is not one of {', '.join(DTYPES)}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if eval_mode not in ("likelihood", "generate"):
            raise ValueError(f"model.eval_mode={eval_mode!r} is not one of likelihood, generate")
        warmup_cosine(1, 0, 0.0, scheduler)  # validates the name now, not at the first step
        self.save_hyperparameters()
        self.model = load_causal_lm(
            model, model_config, dtype, attn_implementation, quantization, compute_dtype, double_quant, local_files_only
        )
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps it: dropout would be off
        self.tokenizer = load_tokenizer_for(model, tokenizer, local_files_only)
        if model_config is not None and len(self.tokenizer) > self.model.config.vocab_size:
            raise ValueError(
                f"model.model_config.vocab_size={self.model.config.vocab_size} is smaller than the tokenizer "
                f"({len(self.tokenizer)}); raise it"
            )
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self._test_tracker = None

    smt_builds_network_in_init = True
    """The model exists after ``__init__``: the SMT callback injects in ``setup``, not after ``configure_model``."""

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): shard each decoder layer as its own unit, then the whole model.

        smt injects in ``setup``, before this runs, so the bank and the wrapped layers exist when sharding; the
        decoder-layer classes come from the model's own ``_no_split_modules``.
        """
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule

        from smt.lightning.distributed import shard_network

        if isinstance(self.model, FSDPModule):  # already sharded (configure_model runs once per trainer entry)
            return
        names = set(getattr(self.model, "_no_split_modules", None) or ())
        units = tuple({type(m) for m in self.model.modules() if type(m).__name__ in names})
        shard_network(self.model, self.device_mesh["data_parallel"], units)

    def smt_target(self) -> torch.nn.Module:
        """The network the SMT callback tunes: the transformers model, so deltas carry its module names."""
        return self.model

    # --- steps ----------------------------------------------------------------------------------------

    def forward(self, **batch) -> Any:
        return self.model(**batch, use_cache=False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Logits only where a label is (the prompt is masked): less memory and compute, same loss.
        inputs = _model_inputs(batch)
        loss = labelled_positions_loss(self.model, inputs)
        if loss is None:  # an architecture with a non-plain head: the model's own loss
            loss = self(**inputs).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        # A validate() before fit() leaves the metric's state as inference tensors, which fit's
        # validation could not update in place: start every epoch from fresh state.
        self.val_perplexity.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(**_model_inputs(batch))
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        self.val_perplexity.update(logits, labels)
        mask = labels != IGNORE_INDEX
        accuracy = ((logits.argmax(-1) == labels) & mask).sum() / mask.sum().clamp_min(1)
        size = batch["input_ids"].shape[0]
        self.log("val/loss", out.loss, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val/token_acc", accuracy, batch_size=size, sync_dist=True)
        self.log("val/ppl", self.val_perplexity, batch_size=size)

    def on_test_epoch_start(self) -> None:
        from smt.eval import AccuracyTracker

        self._test_tracker = AccuracyTracker()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        from smt.eval import get_task

        specs = [get_task(task) for task in batch["task"]]
        with merged(self.model):  # W0 + Δ in the weights (a quantized base adds Δ)
            correct = self._judge_batch(batch, specs)
        self._test_tracker.update_many(list(batch["task"]), correct)

    def _judge_batch(self, batch: dict, specs: list) -> list[bool]:
        from smt.eval import judge

        if self.hparams.eval_mode == "likelihood" and all(s.supports_likelihood for s in specs):
            return self._likelihood_correct(batch, specs)
        outputs = self._generate(batch)
        return [judge(s, o, r).correct for s, o, r in zip(specs, outputs, batch["reference"])]

    def _likelihood_correct(self, batch: dict, specs: list) -> list[bool]:
        from smt.data.prompts import adds_special_tokens
        from smt.eval import score_candidates_batch

        prompts = [p + s.likelihood_prefix for p, s in zip(batch["prompt"], specs)]
        template = getattr(self.trainer.datamodule, "template", "alpaca")  # chat prompts already hold their BOS
        scores = score_candidates_batch(
            self.model, self.tokenizer, prompts, [s.labels for s in specs], device=self.device,
            add_special_tokens=adds_special_tokens(template),
        )  # fmt: skip
        return [sc.prediction == ref.strip().lower() for sc, ref in zip(scores, batch["reference"])]

    def _generate(self, batch: dict) -> list[str]:
        prompt_len = batch["input_ids"].shape[1]
        tokens = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )
        return self.tokenizer.batch_decode(tokens[:, prompt_len:], skip_special_tokens=True)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, str]]:
        """Greedy responses (``max_new_tokens`` long) to the test prompts: ``smt predict`` and the quickstart."""
        with merged(self.model):  # W0 + Δ in the weights (a quantized base adds Δ)
            responses = self._generate(batch)
        return [
            {"prompt": prompt, "response": response, "reference": reference}
            for prompt, response, reference in zip(batch["prompt"], responses, batch["reference"])
        ]

    def on_test_epoch_end(self) -> None:
        from smt.eval import format_markdown_table, write_results_json

        results = self._test_tracker.results()
        for result in results:
            self.log(f"test/acc_{result.task}", result.accuracy)
        rank_zero_info(format_markdown_table(results, title="test accuracy"))
        if self.hparams.results_path and self.trainer.is_global_zero:
            write_results_json(self.hparams.results_path, results, {"model": self.hparams.model})

    # --- optimisation -------------------------------------------------------------------------------

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen; check smt.target_modules/trainable_modules")
        hp = self.hparams
        groups = param_groups(self.trainer, params, hp.lr)  # slots (× smt.lr_scale), a full warm-up's dense weights
        optimizer = build_optimizer(hp.optimizer, groups, hp.lr, tuple(hp.betas), hp.weight_decay, self.device)
        offset = _smt_warmup_offset(self.trainer)
        total = max(1, int(self.trainer.estimated_stepping_batches) - offset)
        shape = warmup_cosine(total, self.hparams.lr_warmup_steps, self.hparams.min_lr_ratio, self.hparams.scheduler)
        # The dense group trains only in the warm-up, at a constant LR; the blocks' schedule starts after it.
        lambdas = [_constant if g.get(GROUP_FLAG) else after_warmup(shape, offset) for g in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints ----------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if not (self.hparams.slim_checkpoints and self.hparams.model):
            return
        # remove_duplicate=False: a tied weight (lm_head = embed_tokens, as in SmolLM2) is in the state dict under
        # both names, and the default listing names it once, which left the head's copy in every "slim" checkpoint.
        named = self.model.named_parameters(remove_duplicate=False)
        frozen = {f"model.{k}" for k, p in named if not p.requires_grad}
        frozen |= {f"model.{k}" for k in quant_state_keys(self.model)}  # a 4-bit weight's scales are not parameters
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["smt_slim"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Put the frozen base weights back into a slim checkpoint, so the load stays strict."""
        if checkpoint.get("smt_slim"):
            checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}

    # --- outputs --------------------------------------------------------------------------------------

    def _save_warm_base(self, delta_path: Path) -> None:
        """After a full warm-up: the warmed base and tokenizer beside the delta (Δ alone does not rebuild the model)."""
        from smt.adapters.warm_base import model_warm_tag, save_warm_base

        tag = model_warm_tag(self.model)
        if tag is not None:
            folder = save_warm_base(self.model, delta_path, tag, self.tokenizer)
            rank_zero_info(f"smt: warmed base written to {folder} (smt merge {folder} {delta_path} OUT)")

    def on_fit_end(self) -> None:
        bank = get_bank(self.model)
        outputs = [path for path in (self.hparams.delta_path, self.hparams.merged_dir) if path]
        if bank is None or not outputs:
            return
        if not bank.tuning:
            rank_zero_info("smt: fit ended inside the warm-up (no selection yet): no delta or merged model written")
            return
        # Every rank decides alike (FSDP2 holds slot shards), so all of them stop together on an all-zero Δ.
        moved = self.trainer.strategy.reduce(local_slots_moved(bank.slots), reduce_op="sum")
        refuse_all_zero_delta(float(moved) > 0, "write " + " and ".join(outputs))
        sharded = self.device_mesh is not None  # FSDP2: gathering slots is a collective, every rank takes part
        if not (self.trainer.is_global_zero or sharded):
            return
        if self.hparams.delta_path:
            from smt.adapters.delta import delta_state
            from smt.core.io import atomic_save_safetensors

            tensors, metadata = delta_state(self.model, base_model_id=self.hparams.model)
            if self.trainer.is_global_zero:
                path = atomic_save_safetensors(tensors, Path(self.hparams.delta_path), metadata)
                rank_zero_info(f"smt: delta written to {path}")
                self._save_warm_base(path)
        if self.hparams.merged_dir and sharded:
            rank_zero_info("smt: merged_dir is not written under FSDP2; apply the delta with `smt merge` instead")
        elif self.hparams.merged_dir and self.trainer.is_global_zero:
            save_merged(self.model, self.tokenizer, self.hparams.merged_dir)
            rank_zero_info(f"smt: merged model written to {self.hparams.merged_dir}")


def _constant(step: int) -> float:
    return 1.0


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}


def _smt_warmup_offset(trainer) -> int:
    from smt.lightning.callback import find_callback

    smt = find_callback(trainer)
    return smt.warmup_offset if smt is not None else 0
