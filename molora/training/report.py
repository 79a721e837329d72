"""The per-layer expert-load heat map of ``molora inspect`` (matplotlib, written as PNG)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)(?:\.(?P<rest>.+))?$")
#: the group of decoder-layer routers (MiLoRA module mode: statistics under the layer's own name, experts = modules)
LAYER_ROUTER = "layer router (modules)"


def load_grid(stats: dict[str, Any]) -> tuple[list[str], list[str], list[list[list[float]]]]:
    """Arrange per-module loads as ``(projections, layer labels, grid[projection][layer] = load[E])``.

    Module names ``<prefix>.<i>.<projection>`` (``model.layers.3.mlp.down_proj``) are grouped by projection and
    ordered by layer index; decoder layers (``model.layers.3``: MiLoRA module mode's routers, whose experts are the
    layer's modules) form the group :data:`LAYER_ROUTER`; other names form their own group with a single row.
    """
    matches = {name: _LAYER.match(name) for name in stats}
    # an encoder-decoder model has two stacks of layers (T5's encoder.block.0 / decoder.block.0): their projections
    # are told apart by the stack's prefix, which a decoder-only model's one stack does not need
    prefixes = {match["prefix"] for match in matches.values() if match}
    groups: dict[str, dict[int | str, list[float]]] = {}
    for name, s in stats.items():
        match = matches[name]
        if match:
            group = match["rest"] or LAYER_ROUTER
            if len(prefixes) > 1:
                group = f"{match['prefix']}.*.{match['rest']}" if match["rest"] else f"{match['prefix']}.*"
            groups.setdefault(group, {})[int(match["index"])] = s["load"]
        else:
            groups.setdefault(name, {})[name] = s["load"]
    projections = sorted(groups)
    layers = sorted({k for g in groups.values() for k in g}, key=lambda k: (isinstance(k, str), str(k).zfill(6)))
    n_experts = max(len(s["load"]) for s in stats.values())
    nan = float("nan")
    # routers with fewer experts (several adapters, MiLoRA layers adapting fewer modules) leave their extra cells empty
    grid = [
        [list(groups[p].get(layer, [])) + [nan] * (n_experts - len(groups[p].get(layer, []))) for layer in layers]
        for p in projections
    ]
    return projections, [str(layer) for layer in layers], grid


def save_heatmap(stats: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Draw one heat map per projection type (rows: layers, columns: experts, colour: share of assignments).

    The colour scale runs from 0 to the largest load, and at least to ``2/E`` (capped at 1, a load's largest value), so
    that a perfectly balanced router's ``1/E`` sits mid-scale unless some expert takes more than ``2/E``; the colour
    bar names ``1/E`` (for each expert count when the routers have several). ``path``: the image file (its
    suffix names the format: ``.png``, ``.pdf``, ``.svg``, ...; without one, ``.png`` is added), or an existing
    folder to write ``expert_load.png`` into. Returns the path written.
    """
    from ..hub import HEATMAP_FILE

    path = Path(path)
    if path.is_dir():
        path = path / HEATMAP_FILE
    elif not path.suffix:
        path = path.with_name(path.name + ".png")  # what matplotlib would write: say so
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    projections, layers, grid = load_grid(stats)
    data = np.array(grid, dtype=float)  # [P, L, E]
    n_experts = data.shape[2]
    vmax = min(1.0, max(float(np.nanmax(data)) if np.isfinite(data).any() else 1.0, 2.0 / n_experts))
    sizes = sorted({len(s["load"]) for s in stats.values()})
    cols = min(len(projections), 4)
    rows = (len(projections) + cols - 1) // cols
    height = max(2.5, 0.18 * len(layers) + 1.2)
    # wide enough for the title even with one group of rows
    # constrained layout: titles of the second row of panels cleared the first row's axis labels only by chance
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(2.6 * cols + 1.2, 6.0), height * rows), squeeze=False, layout="constrained"
    )
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= len(projections):
            ax.axis("off")
            continue
        image = ax.imshow(data[i], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(projections[i], fontsize=8)
        ax.set_xticks(range(n_experts))
        # MiLoRA module mode: the columns of a decoder layer's router are its adapted projections
        ax.set_xlabel("module" if projections[i] == LAYER_ROUTER else "expert", fontsize=7)
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step))
        ax.set_yticklabels(layers[::step], fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
        if i % cols == 0:
            ax.set_ylabel("layer", fontsize=7)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
        balanced = ", ".join(f"{1 / e:.3f}" + (f" with {e} experts" if len(sizes) > 1 else "") for e in sizes)
        bar.set_label(f"share of assignments (balanced = {balanced})", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"MoLoRA expert load{' - ' + title if title else ''}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
