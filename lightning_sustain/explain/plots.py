"""SHAP figures drawn with matplotlib's object API: beeswarm, bar, image overlay, token bar.

The beeswarm and bar plots follow ``shap.plots.beeswarm`` / ``shap.plots.bar`` (features
sorted by mean |SHAP|, one row each, points coloured by feature value from blue to red) but
are drawn here: ``import shap`` alone costs seconds (scikit-learn, pandas, numba), which a
callback that runs at the end of every fit should not pay for a figure. Figures are
pyplot-free (``matplotlib.figure.Figure``): no GUI backend, nothing left in pyplot's
registry. Random jitter uses a private generator, never the global one. Layout is fixed
(margins from the label lengths), not ``tight_layout``/``bbox_inches="tight"``, which
measure every text several times and were most of the plotting time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["bar_figure", "beeswarm_figure", "image_figure", "new_figure", "token_bar_figure"]

_BLUE, _RED = "#008bfb", "#ff0052"


def new_figure(width: float, height: float) -> Any:
    """A pyplot-free figure of the given size in inches."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _margins(fig: Any, labels: Sequence[str], height_in: float, right_in: float = 0.3) -> None:
    """Leave room for the y tick labels and the title without measuring text."""
    width_in = fig.get_figwidth()
    left_in = 0.4 + 0.075 * max((len(str(lb)) for lb in labels), default=4)
    fig.subplots_adjust(
        left=min(0.6, left_in / width_in),
        right=1.0 - right_in / width_in,
        bottom=0.7 / height_in,
        top=1.0 - 0.55 / height_in,
    )


def _order(values: np.ndarray, max_display: int) -> np.ndarray:
    importance = np.abs(values).mean(axis=0)
    return np.argsort(-importance, kind="stable")[:max_display]


def beeswarm_figure(
    values: np.ndarray,
    data: np.ndarray | None,
    feature_names: Sequence[str],
    title: str,
    max_display: int = 20,
) -> Any:
    """SHAP values per feature, one row per feature, most important on top.

    Args:
        values: ``(N, D)`` SHAP values.
        data: ``(N, D)`` feature values used to colour the points, or ``None`` (grey).
        feature_names: ``D`` names.
        title: the axes title.
        max_display: features shown.

    Returns:
        The figure.
    """
    from matplotlib.colors import LinearSegmentedColormap

    order = _order(values, max_display)
    height = 0.4 * len(order) + 1.5
    fig = new_figure(8.0, height)
    labels = [str(feature_names[i]) for i in order[::-1]]
    _margins(fig, labels, height, right_in=1.2 if data is not None else 0.3)
    ax = fig.add_subplot()
    cmap = LinearSegmentedColormap.from_list("shap_br", [_BLUE, "#7b00ff", _RED])
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(len(order)), values.shape[0])
    phi = values[:, order[::-1]].T.reshape(-1)
    y = rows + rng.uniform(-0.3, 0.3, size=len(rows))
    if data is not None:
        cols = data[:, order[::-1]].astype(np.float64)
        lo, hi = np.nanpercentile(cols, [5, 95], axis=0) if len(cols) else (0.0, 1.0)
        span = np.where(hi > lo, hi - lo, 1.0)
        scaled = np.clip((cols - lo) / span, 0.0, 1.0).T.reshape(-1)
        scatter = ax.scatter(phi, y, c=scaled, cmap=cmap, vmin=0, vmax=1, s=12, linewidths=0)
        bar = fig.colorbar(scatter, ax=ax, ticks=[0, 1], aspect=40, pad=0.02)
        bar.ax.set_yticklabels(["low", "high"])
        bar.set_label("feature value")
    else:
        ax.scatter(phi, y, color="#777777", s=12, linewidths=0)
    ax.axvline(0.0, color="#999999", linewidth=0.8)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(labels)
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.set_xlabel("SHAP value (impact on model output)")
    ax.set_title(title, fontsize=10)
    return fig


def bar_figure(values: np.ndarray, names: Sequence[str], title: str, max_display: int = 20) -> Any:
    """Mean |SHAP| per feature as horizontal bars, most important on top.

    Args:
        values: ``(N, D)`` SHAP values.
        names: ``D`` names.
        title: the axes title.
        max_display: bars shown.

    Returns:
        The figure.
    """
    order = _order(values, max_display)
    importance = np.abs(values).mean(axis=0)
    return _bars([str(names[i]) for i in order], importance[order], title, "mean |SHAP value|")


def token_bar_figure(labels: Sequence[str], scores: Sequence[float], title: str) -> Any:
    """The tokens that matter most overall (scores already sorted, largest first)."""
    return _bars(list(labels), np.asarray(scores), title, "mean |SHAP| per example")


def _bars(labels: list[str], scores: np.ndarray, title: str, xlabel: str) -> Any:
    height = 0.4 * len(labels) + 1.5
    fig = new_figure(8.0, height)
    _margins(fig, labels, height, right_in=0.8)
    ax = fig.add_subplot()
    y = np.arange(len(labels))[::-1]
    ax.barh(y, scores, color=_RED)
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    for yi, score in zip(y, scores, strict=True):
        ax.text(score, yi, f" {score:.3g}", va="center", fontsize=8)
    return fig


def image_figure(values: np.ndarray, data: np.ndarray | None, title: str, max_rows: int = 4) -> Any:
    """Per-pixel attributions (channels summed) for a few images, with their mean |SHAP|.

    Args:
        values: ``(N, C, H, W)`` SHAP values.
        data: ``(N, C, H, W)`` images, or ``None`` to leave them out (sensitive data).
        title: prefix of each panel title (the output name).
        max_rows: images shown.

    Returns:
        The figure.
    """
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("shap_rb", [_BLUE, "#ffffff", _RED])
    summed = values.sum(axis=1)  # (N, H, W)
    rows = min(max_rows, len(summed))
    n_cols = 2 if data is not None else 1
    fig = new_figure(3.0 * n_cols + 1.0, 2.6 * (rows + 1))
    vmax = float(np.nanpercentile(np.abs(summed), 99.9)) or 1.0
    # row 0: mean |SHAP| over all explained images (an aggregate, never raw data)
    ax = fig.add_subplot(rows + 1, n_cols, 1)
    im = ax.imshow(np.abs(summed).mean(axis=0), cmap="magma")
    ax.set_title(f"mean |SHAP| ({len(summed)} images)", fontsize=9)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046)
    for r in range(rows):
        col = 1
        gray = None
        if data is not None:
            img = data[r]
            gray = img.mean(axis=0)
            ax = fig.add_subplot(rows + 1, n_cols, (r + 1) * n_cols + col)
            shown = np.moveaxis(img, 0, -1) if img.shape[0] in (3, 4) else gray
            lo, hi = float(shown.min()), float(shown.max())
            ax.imshow((shown - lo) / (hi - lo + 1e-12), cmap="gray")
            ax.set_title(f"input {r}", fontsize=9)
            ax.axis("off")
            col += 1
        ax = fig.add_subplot(rows + 1, n_cols, (r + 1) * n_cols + col)
        if gray is not None:
            ax.imshow(gray, cmap="gray", alpha=0.15)
        im = ax.imshow(summed[r], cmap=cmap, vmin=-vmax, vmax=vmax, alpha=0.85)
        ax.set_title(f"SHAP, {title}, input {r}", fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=fig.axes, orientation="horizontal", fraction=0.03, label="SHAP value")
    return fig
