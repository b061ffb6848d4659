"""Heatmap of a selection: one panel per module kind, layers stacked top to bottom.

Module names like ``model.layers.7.self_attn.v_proj`` are split into a kind (``self_attn.v_proj``) and a
layer (7); each panel shows the kind's block grid for every layer, selected blocks bright.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

_LAYER = re.compile(r"\.(\d+)\.")


def module_kind(name: str) -> tuple[str, int]:
    """``(kind, layer)`` of a module name; layer is -1 when the name has no numbered part."""
    match = _LAYER.search(name)
    if not match:
        return name, -1
    return name[match.end() :], int(match.group(1))


def selection_images(selection) -> dict[str, torch.Tensor]:
    """Per kind, a ``[layers · n_rb, n_cb]`` 0/1 image of chosen blocks (layers in ascending order)."""
    by_kind: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name in selection.grids:
        kind, layer = module_kind(name)
        by_kind[kind].append((layer, name))
    images = {}
    for kind, members in by_kind.items():
        rows = []
        for _, name in sorted(members):
            grid = selection.grids[name]
            image = torch.zeros(grid.shape)
            index = selection.blocks.get(name)
            if index is not None and index.numel():
                image[index[:, 0], index[:, 1]] = 1.0
            rows.append(image)
        width = max(r.shape[1] for r in rows)
        images[kind] = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows])
    return images


def selection_figure(selection):
    """A matplotlib figure of ``selection``: one panel per module kind (close it with ``plt.close(fig)``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    images = selection_images(selection)
    fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images) + 1, 6), squeeze=False)
    for ax, (kind, image) in zip(axes[0], sorted(images.items())):
        ax.imshow(image.numpy(), aspect="auto", cmap="magma", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"{kind}\n{int(image.sum())} blocks", fontsize=8)
        ax.set_xlabel("column block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("layer × row block (top = first layer)")
    fig.suptitle(selection.summary(), fontsize=9)
    fig.tight_layout()
    return fig


def draw_selection(selection, path: Path) -> Path:
    """Write the heatmap PNG of ``selection`` to ``path``."""
    import matplotlib.pyplot as plt

    fig = selection_figure(selection)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
