"""Draw the per-layer gradient-flow figure of one demo run."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

NORM_COLUMN = "grad_norm_median"


def _layer_order(layer_frame: pd.DataFrame) -> list[str]:
    """Return layer names in forward order, input layer first."""
    if "depth" in layer_frame.columns:
        ordered = layer_frame.sort_values("depth", kind="stable")
    else:
        ordered = layer_frame
    return list(dict.fromkeys(ordered["layer"]))


def plot_gradient_flow(
    layer_frame: pd.DataFrame,
    path: str | Path,
    title: str,
    norm_column: str = NORM_COLUMN,
) -> Path:
    """Save per-layer gradient norms against depth, one line per epoch, as PNG.

    Args:
        layer_frame: one row per (epoch, layer), with the columns `epoch`,
            `layer`, `depth` and `norm_column`, as returned by
            `GradWatch.to_dataframe(level="layer")`.
        path: where the PNG is written. Parent directories must exist.
        title: figure title.
        norm_column: the statistic to draw. Defaults to the median over the
            epoch's steps of each layer's gradient L2 norm.

    The y axis is logarithmic, so norms that are exactly zero are drawn as
    red triangles on the bottom edge. Non-finite norms are drawn as red
    crosses on the top edge. The legend names both markers.
    """
    path = Path(path)
    layers = _layer_order(layer_frame)
    position = {name: index for index, name in enumerate(layers)}
    epochs = sorted(layer_frame["epoch"].unique())

    norms = layer_frame[norm_column].to_numpy(dtype=np.float64)
    finite_positive = norms[np.isfinite(norms) & (norms > 0)]
    if finite_positive.size:
        low, high = finite_positive.min(), finite_positive.max()
    else:
        low, high = 1e-8, 1.0
    # Zero norms sit one decade below the smallest positive norm, and
    # non-finite ones one decade above the largest, so neither hides a line.
    floor, ceiling = low / 10.0, high * 10.0

    # The figure is drawn on an Agg canvas directly, without pyplot, so that
    # plotting neither needs nor changes a global matplotlib backend.
    figure = Figure(figsize=(7.5, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    colormap = matplotlib.colormaps["viridis"]
    color_scale = Normalize(vmin=min(epochs), vmax=max(max(epochs), min(epochs) + 1))
    any_zero = False
    any_nonfinite = False

    for epoch in epochs:
        rows = layer_frame[layer_frame["epoch"] == epoch]
        x = np.array([position[name] for name in rows["layer"]])
        y = rows[norm_column].to_numpy(dtype=np.float64)
        order = np.argsort(x)
        x, y = x[order], y[order]
        color = colormap(color_scale(epoch))

        zero = y == 0
        nonfinite = ~np.isfinite(y)
        drawn = np.where(zero, floor, np.where(nonfinite, ceiling, y))
        axes.plot(x, drawn, color=color, linewidth=1.0, alpha=0.8)
        if zero.any():
            any_zero = True
            axes.scatter(x[zero], drawn[zero], marker="v", color="red", s=30, zorder=3)
        if nonfinite.any():
            any_nonfinite = True
            axes.scatter(x[nonfinite], drawn[nonfinite], marker="x", color="red", s=30, zorder=3)

    axes.set_yscale("log")
    axes.set_ylim(floor / 2.0, ceiling * 2.0)
    axes.set_xticks(range(len(layers)))
    axes.set_xticklabels(layers, rotation=45, ha="right")
    axes.set_xlabel("layer (input side at left)")
    axes.set_ylabel(f"gradient L2 norm ({norm_column.replace('grad_norm_', '')} per epoch)")
    axes.set_title(title)
    axes.grid(True, which="major", axis="y", alpha=0.3)

    handles = []
    if any_zero:
        handles.append(
            Line2D(
                [],
                [],
                marker="v",
                color="red",
                linestyle="",
                label=f"exactly 0 (drawn at {floor:.0e})",
            )
        )
    if any_nonfinite:
        handles.append(
            Line2D(
                [],
                [],
                marker="x",
                color="red",
                linestyle="",
                label=f"NaN or inf (drawn at {ceiling:.0e})",
            )
        )
    if handles:
        axes.legend(handles=handles, loc="best", fontsize="small")

    colorbar = figure.colorbar(ScalarMappable(norm=color_scale, cmap=colormap), ax=axes)
    colorbar.set_label("epoch (from 0, as in report.json)")
    colorbar.locator = MaxNLocator(integer=True)
    colorbar.update_ticks()

    figure.tight_layout()
    figure.savefig(path)
    return path
