"""Checkpoints that survive crashes and hostile files: atomic writes, verified reads, a save on SIGTERM.

- ``AtomicCheckpointIO`` (a Lightning ``CheckpointIO``, the default of ``smt fit``): a checkpoint is written to
  a temporary name in its folder, fsynced and renamed over the target, so a run killed mid-write leaves the
  previous file intact and never a truncated one under the real name. A full disk raises a one-line error.
- ``read_checkpoint``: the only way smt reads a checkpoint. Before ``torch.load(weights_only=True)`` (no code
  runs) the zip container is checked: every record stored uncompressed (what ``torch.save`` writes, so a
  record's size is bounded by the file's and a hostile header cannot make it allocate more) and every CRC-32
  right (a flipped bit is refused, not loaded as a wrong weight).
- ``PreemptionCheckpoint``: on SIGTERM (cluster pre-emption) the run saves ``last.ckpt`` at the next training
  or validation batch end and exits; ``--ckpt_path last`` resumes it.
"""

from __future__ import annotations

import signal
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from smt.core.io import atomic_write
from smt.lightning.step_flags import step_flags

CRC_CHUNK = 1 << 22  # bytes read at a time while checking CRCs: memory stays bounded for any checkpoint size


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """A Lightning checkpoint, verified and loaded without executing code.

    Raises:
        ValueError: missing, truncated, bit-flipped or hostile file, or not a Lightning checkpoint.
    """
    path = Path(path)
    return _lightning_checkpoint(path, _load_verified(path, map_location))


def _lightning_checkpoint(path: Path, checkpoint: Any) -> dict:
    """``checkpoint`` if it is a Lightning checkpoint whose state dict holds only named tensors."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"checkpoint {path} has no state_dict; give a Lightning checkpoint (.ckpt)")
    bad = [k for k, v in checkpoint["state_dict"].items() if not isinstance(k, str) or not _is_state(k, v)]
    if bad:
        raise ValueError(f"checkpoint {path}: state_dict entry {bad[0]!r} is not a named tensor; the file is damaged")
    return checkpoint


def _load_verified(path: Path, map_location: Any) -> Any:
    """``torch.load(weights_only=True)`` of a file whose zip container was checked first."""
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist; check the path")
    _verify_container(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for damaged or hostile files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(f"checkpoint {path} cannot be read safely ({reason}); is it a Lightning .ckpt?") from err


def _is_state(key: str, value: Any) -> bool:
    return torch.is_tensor(value) or key.endswith("_extra_state")  # extra state is whatever a module returns


def _verify_container(path: Path) -> None:
    """Refuse anything but an intact, uncompressed torch zip archive (before torch parses a byte of it)."""
    try:
        problem = _container_problem(path)
    except Exception as err:  # zipfile raises BadZipFile, UnicodeDecodeError, EOFError, struct.error, ... on damage
        problem = (str(err).splitlines() or [type(err).__name__])[0][:120]
    if problem:
        raise ValueError(f"checkpoint {path} is truncated or damaged ({problem}); resume from an earlier checkpoint")


def _container_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        records = archive.infolist()
        if not any(r.filename.endswith("/data.pkl") or r.filename == "data.pkl" for r in records):
            return "no data.pkl: not a torch checkpoint"
        for record in records:
            if record.compress_type != zipfile.ZIP_STORED or record.file_size > size:
                return f"record {record.filename} is compressed or oversized"
            _check_crc(archive, record)
    return None


def _check_crc(archive: zipfile.ZipFile, record: zipfile.ZipInfo) -> None:
    with archive.open(record) as handle:  # zipfile raises BadZipFile on a CRC mismatch at the end
        while handle.read(CRC_CHUNK):
            pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes atomically and reads through ``read_checkpoint``.

    Example:
        >>> trainer = Trainer(plugins=[AtomicCheckpointIO()])  # what `smt fit` uses by default
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_write(Path(path), lambda tmp: self.write_payload(checkpoint, tmp), "checkpoint")

    def write_payload(self, checkpoint: dict[str, Any], temporary: str) -> None:
        """Serialize ``checkpoint`` into the temporary file (a seam: tests kill the process in here)."""
        torch.save(checkpoint, temporary)

    @override
    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise ValueError(f"checkpoint {path}: smt never unpickles code (weights_only=False was asked for)")
        loaded = _load_verified(Path(path), map_location if map_location is not None else "cpu")
        if isinstance(loaded, dict) and "state_dict" not in loaded and all(_is_state(k, v) for k, v in loaded.items()):
            return loaded  # a bare state dict: how ddp_spawn/ddp_fork hand rank 0's weights to the main process
        return _lightning_checkpoint(Path(path), loaded)


def with_atomic_checkpoint_io(plugins: Any) -> list:
    """``plugins`` plus an ``AtomicCheckpointIO`` unless one ``CheckpointIO`` is already given."""
    from lightning.fabric.plugins import CheckpointIO

    given = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in given):
        return given
    return [*given, AtomicCheckpointIO()]


class PreemptionCheckpoint(Callback):
    """On SIGTERM, save ``last.ckpt`` at the next training or validation batch end and stop (exit status 143).

    Lightning only notes a SIGTERM and acts on it at fixed points (after a validation batch, at the end of a
    training batch's validation, at an epoch's end) without a checkpoint: a pre-empted job would lose
    everything since its last periodic checkpoint. Under DDP its handler also runs a broadcast from inside the
    signal handler, a collective that can pair with any other, and each rank stops on its own. So from the
    sanity check on this callback's own handler only notes the signal, and all ranks decide together after
    each optimizer step (the flag joins the step's one reduced vector, ``smt.lightning.step_flags``; a
    micro-batch of gradient accumulation is never saved half-accumulated) and after each validation batch of
    ``fit`` (one summed flag). On one device the signal is acted on after every batch, with no tensor and no host
    sync. A checkpoint taken mid-validation holds the state after the last optimizer step, as one taken after that
    training batch would: resuming repeats no step (validation changes no weight).

    Example:
        >>> trainer = Trainer(callbacks=[PreemptionCheckpoint()])  # on by default in `smt fit`
    """

    def __init__(self) -> None:
        self.saved_path: Path | None = None
        self._received = False
        self._batch_key: tuple[int, int] | None = None
        self._stop_after_step = False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        step_flags(trainer).add(self._flag, lambda: float(self._signalled(trainer)))

    @property
    def _flag(self) -> str:
        return f"preemption {id(self)}"

    @override
    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._listen()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._listen()  # no sanity check ran (Lightning installs its handlers just before it would)

    def _listen(self) -> None:
        """Replace Lightning's SIGTERM handler by one that only notes the signal (Lightning restores it at teardown)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self._received = True

    def _signalled(self, trainer: Trainer) -> bool:
        return self._received or bool(getattr(trainer, "received_sigterm", False))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._batch_key, self._stop_after_step = (trainer.current_epoch, batch_idx), False

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if trainer.world_size > 1:  # all ranks stop together, on the step's one reduced vector
            self._stop_after_step = step_flags(trainer).totals(trainer, self._batch_key)[self._flag] > 0

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._stop_after_step if trainer.world_size > 1 else self._signalled(trainer):
            self._save_and_stop(trainer)

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:  # before any step there is nothing to save
            self._stop_if_signalled(trainer, pl_module)

    def _stop_if_signalled(self, trainer: Trainer, pl_module: LightningModule) -> None:
        received = self._signalled(trainer)
        if trainer.world_size > 1:  # all ranks stop together
            flag = torch.tensor(float(received), device=pl_module.device)
            received = float(trainer.strategy.reduce(flag, reduce_op="sum")) > 0.0
        if received:
            self._save_and_stop(trainer)

    def _save_and_stop(self, trainer: Trainer) -> None:
        self.saved_path = checkpoint_folder(trainer) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}.ckpt"
        trainer.save_checkpoint(self.saved_path)
        rank_zero_info(f"smt: SIGTERM: saved {self.saved_path} at step {trainer.global_step}; resume with --ckpt_path")
        raise PreemptedError(self.saved_path, trainer.global_step)


class PreemptedError(SIGTERMException):
    """The run stopped on SIGTERM after saving ``path`` (a ``SystemExit``: Lightning tears down, then exits 143)."""

    def __init__(self, path: Path, step: int) -> None:
        super().__init__(143)
        self.path, self.step = path, step


def checkpoint_folder(trainer: Trainer) -> Path:
    """Where the run's ``ModelCheckpoint`` writes (so ``--ckpt_path last`` finds it), else ``<root>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"
