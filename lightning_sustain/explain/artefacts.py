"""Write SHAP artefacts (plots, values, JSON and Markdown summaries) and read them back.

Layout of an artefact directory::

    shap_values.npz           values, base values, model output, names (+ data if allowed)
    summary.json              explainer, reasons, timing, top features per output, privacy
    summary.md                the same, short, for humans
    beeswarm_<output>.png     tabular / tensor inputs
    image_<output>.png        image inputs: per-pixel attribution overlay
    bar_<output>.png          mean |SHAP| per feature (per channel for images)
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sustain.explain.core import ShapResult

__all__ = ["SUMMARY_SCHEMA", "ArtefactIndex", "load_summary", "write_artefacts"]

logger = logging.getLogger(__name__)

SUMMARY_SCHEMA = "lightning_sustain.shap_summary/1"

FigureHook = Callable[[str, Any], None]


@dataclass
class ArtefactIndex:
    """Paths of the artefacts written by :func:`write_artefacts`.

    Attributes:
        directory: the artefact directory.
        summary_json: ``summary.json``.
        summary_md: ``summary.md``.
        values_npz: ``shap_values.npz`` (``None`` when values were not written).
        plots: plot kind and output name -> PNG path, e.g. ``{"beeswarm/class_1": ...}``.
    """

    directory: Path
    summary_json: Path
    summary_md: Path
    values_npz: Path | None
    plots: dict[str, Path] = field(default_factory=dict)


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return slug or "output"


def _feature_labels(result: ShapResult) -> list[str]:
    """Names of the units summaries rank: features, or pixels for images."""
    if result.input_kind == "image":
        _, h, w = result.input_shape
        return [f"pixel(h={i},w={j})" for i in range(h) for j in range(w)]
    assert result.feature_names is not None
    return result.feature_names


def _importance(result: ShapResult) -> np.ndarray:
    """Mean |SHAP| per ranked unit and output, ``(D, K)``; images: summed over channels."""
    if result.input_kind == "image":
        per_pixel = np.abs(result.values).sum(axis=1)  # (N, H, W, K)
        return per_pixel.reshape(per_pixel.shape[0], -1, per_pixel.shape[-1]).mean(axis=0)
    return result.mean_abs()


def _new_figure(width: float, height: float) -> Any:
    # a pyplot-free figure: no GUI backend involved, nothing left in pyplot's registry
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _beeswarm(result: ShapResult, k: int, show_values: bool, max_display: int) -> Any:
    import shap

    n = result.n_explained
    values = result.values[..., k].reshape(n, -1)
    data = result.data.reshape(n, -1) if show_values else None
    exp = shap.Explanation(
        values=values,
        base_values=np.full(n, result.base_values[k]),
        data=data,
        feature_names=result.feature_names,
    )
    shown = min(max_display, values.shape[1])
    fig = _new_figure(8.0, 0.4 * shown + 1.5)
    ax = fig.add_subplot()
    shap.plots.beeswarm(exp, max_display=max_display, ax=ax, show=False, plot_size=None)
    title = f"SHAP values for {result.output_names[k]}"
    if not show_values:
        title += "\n(feature values withheld: sensitive data)"
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _bar(result: ShapResult, k: int, max_display: int) -> Any:
    import shap

    n = result.n_explained
    if result.input_kind == "image":
        values = result.values[..., k].sum(axis=(2, 3))  # (N, C)
        names = [f"channel_{c}" for c in range(values.shape[1])]
    else:
        values = result.values[..., k].reshape(n, -1)
        names = result.feature_names
    exp = shap.Explanation(values=values, data=None, feature_names=names)
    shown = min(max_display, values.shape[1])
    fig = _new_figure(8.0, 0.4 * shown + 1.5)
    ax = fig.add_subplot()
    shap.plots.bar(exp, max_display=max_display, ax=ax, show=False)
    ax.set_title(f"mean |SHAP| for {result.output_names[k]}")
    fig.tight_layout()
    return fig


def _image_overlay(result: ShapResult, k: int, show_values: bool, max_rows: int) -> Any:
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("shap_rb", ["#008bfb", "#ffffff", "#ff0052"])
    values = result.values[..., k].sum(axis=1)  # (N, H, W): channels summed
    rows = min(max_rows, len(values))
    n_cols = 2 if show_values else 1
    fig = _new_figure(3.0 * n_cols + 1.0, 2.6 * (rows + 1))
    vmax = float(np.nanpercentile(np.abs(values), 99.9)) or 1.0
    # row 0: mean |SHAP| over all explained images (an aggregate, never raw data)
    ax = fig.add_subplot(rows + 1, n_cols, 1)
    im = ax.imshow(np.abs(values).mean(axis=0), cmap="magma")
    ax.set_title(f"mean |SHAP| ({len(values)} images)", fontsize=9)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046)
    for r in range(rows):
        col = 1
        gray = None
        if show_values:
            img = result.data[r]
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
        im = ax.imshow(values[r], cmap=cmap, vmin=-vmax, vmax=vmax, alpha=0.85)
        ax.set_title(f"SHAP, {result.output_names[k]}, input {r}", fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=fig.axes, orientation="horizontal", fraction=0.03, label="SHAP value")
    return fig


def _save(fig: Any, path: Path, tag: str, on_figure: FigureHook | None) -> None:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    if on_figure is not None:
        try:
            on_figure(tag, fig)
        except Exception as err:  # a logger failing must not lose the files
            logger.warning("Could not log SHAP figure %r: %s", tag, err)


def write_artefacts(
    result: ShapResult,
    directory: str | Path,
    *,
    sensitive_data: bool = False,
    write_feature_values: bool = False,
    write_values: bool = True,
    top_n: int = 10,
    max_display: int = 20,
    max_image_rows: int = 4,
    context: dict[str, Any] | None = None,
    on_figure: FigureHook | None = None,
) -> ArtefactIndex:
    """Write plots, ``shap_values.npz``, ``summary.json`` and ``summary.md``.

    Args:
        result: what :func:`~lightning_sustain.explain.explain_model` returned.
        directory: where to write (created if missing).
        sensitive_data: the inputs came from protected data (e.g. encrypted shards). Raw
            feature values are then kept off disk: no ``data`` in the npz, beeswarm points
            not coloured by feature value, image plots without the input image.
        write_feature_values: write raw feature values even for sensitive data (opt-in).
        write_values: write ``shap_values.npz`` (per-row SHAP values). Note that for simple
            models per-row SHAP values can reveal inputs (linear: ``x = phi / w + E[x]``).
        top_n: features per output listed in the summaries.
        max_display: features shown in beeswarm and bar plots.
        max_image_rows: example images per overlay plot.
        context: extra JSON-serialisable facts for ``summary.json`` (epoch, step...).
        on_figure: called as ``on_figure(tag, figure)`` before each figure is closed, e.g.
            to log it to TensorBoard.

    Returns:
        The :class:`ArtefactIndex`.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    show_values = (not sensitive_data) or write_feature_values
    plots: dict[str, Path] = {}
    t0 = time.perf_counter()
    for k, name in enumerate(result.output_names):
        slug = _slug(name)
        if result.input_kind == "image":
            fig = _image_overlay(result, k, show_values, max_image_rows)
            plots[f"image/{name}"] = out / f"image_{slug}.png"
            _save(fig, plots[f"image/{name}"], f"shap/image/{name}", on_figure)
        else:
            fig = _beeswarm(result, k, show_values, max_display)
            plots[f"beeswarm/{name}"] = out / f"beeswarm_{slug}.png"
            _save(fig, plots[f"beeswarm/{name}"], f"shap/beeswarm/{name}", on_figure)
        fig = _bar(result, k, max_display)
        plots[f"bar/{name}"] = out / f"bar_{slug}.png"
        _save(fig, plots[f"bar/{name}"], f"shap/bar/{name}", on_figure)
    plot_s = time.perf_counter() - t0

    npz_path: Path | None = None
    if write_values:
        npz_path = out / "shap_values.npz"
        arrays: dict[str, Any] = {
            "values": result.values,
            "base_values": result.base_values,
            "model_output": result.model_output,
            "output_indices": np.asarray(result.output_indices, dtype=np.int64),
            "output_names": np.asarray(result.output_names, dtype=str),
            "feature_names": np.asarray(_feature_labels(result), dtype=str),
            "input_shape": np.asarray(result.input_shape, dtype=np.int64),
        }
        if show_values:
            arrays["data"] = result.data
        np.savez_compressed(npz_path, **arrays)

    labels = _feature_labels(result)
    importance = _importance(result)
    outputs = []
    for k, name in enumerate(result.output_names):
        order = np.argsort(-importance[:, k])[:top_n]
        outputs.append(
            {
                "index": result.output_indices[k],
                "name": name,
                "base_value": float(result.base_values[k]),
                "additivity_max_abs_error": result.additivity_max_abs_error[k],
                "top_features": [
                    {"name": labels[i], "mean_abs_shap": float(importance[i, k])} for i in order
                ],
                "plots": {
                    kind.split("/")[0]: path.name
                    for kind, path in plots.items()
                    if kind.split("/", 1)[1] == name
                },
            }
        )
    if not sensitive_data:
        privacy_note = "Inputs are not marked sensitive; feature values are written."
    elif write_feature_values:
        privacy_note = (
            "Inputs come from sensitive data and the user opted in "
            "(write_feature_values=True): raw feature values ARE written."
        )
    else:
        privacy_note = (
            "Inputs come from sensitive data: raw feature values are not written (no `data` "
            "in shap_values.npz, beeswarm points not coloured by feature value, no input "
            "images). SHAP values are derived from the data and can reveal inputs of simple "
            "models."
        )
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "status": "ok",
        "created_unix_s": time.time(),
        "explainer": result.explainer,
        "explainer_requested": result.requested_explainer,
        "selection_reasons": result.selection_reasons,
        "deep_unsupported": result.deep_unsupported,
        "input_kind": result.input_kind,
        "input_shape": list(result.input_shape),
        "n_background": result.n_background,
        "n_explained": result.n_explained,
        "n_requested": result.n_requested,
        "budget_exhausted": result.budget_exhausted,
        "time_budget_s": result.time_budget_s,
        "explain_s": result.elapsed_s,
        "plot_s": plot_s,
        "seed": result.seed,
        "settings": result.settings,
        "outputs": outputs,
        "privacy": {
            "sensitive_data": sensitive_data,
            "feature_values_written": show_values,
            "note": privacy_note,
        },
        "files": {
            "values": npz_path.name if npz_path else None,
            "markdown": "summary.md",
            "plots": sorted(p.name for p in plots.values()),
        },
        "versions": _versions(),
        "context": context or {},
    }
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    md_path = out / "summary.md"
    md_path.write_text(_markdown(summary))
    return ArtefactIndex(out, json_path, md_path, npz_path, plots)


def _versions() -> dict[str, str]:
    import shap
    import torch

    from lightning_sustain import __version__

    return {"lightning_sustain": __version__, "shap": shap.__version__, "torch": torch.__version__}


def _markdown(s: dict[str, Any]) -> str:
    lines = [
        "# SHAP summary",
        "",
        f"- Explainer: **{s['explainer']}** (requested: `{s['explainer_requested']}`)",
    ]
    lines += [f"  - {reason}" for reason in s["selection_reasons"]]
    budget = (
        f"; time budget of {s['time_budget_s']} s reached, {s['n_explained']} of "
        f"{s['n_requested']} rows explained"
        if s["budget_exhausted"]
        else ""
    )
    lines += [
        f"- Explained {s['n_explained']} rows against {s['n_background']} background rows "
        f"in {s['explain_s']:.2f} s (plots {s['plot_s']:.2f} s){budget}.",
        f"- Privacy: {s['privacy']['note']}",
        "",
    ]
    for out in s["outputs"]:
        lines += [
            f"## {out['name']} (output {out['index']})",
            "",
            f"Base value E[f(x)] = {out['base_value']:.4g}; additivity error "
            f"max |sum(SHAP) - (f(x) - E[f(x)])| = {out['additivity_max_abs_error']:.3g}.",
            "",
            "| rank | feature | mean abs SHAP |",
            "|---:|---|---:|",
        ]
        for rank, feat in enumerate(out["top_features"], start=1):
            name = str(feat["name"]).replace("|", "\\|")
            lines.append(f"| {rank} | {name} | {feat['mean_abs_shap']:.4g} |")
        lines.append("")
        for kind, fname in out["plots"].items():
            lines.append(f"![{kind} {out['name']}]({fname})")
        lines.append("")
    return "\n".join(lines)


def load_summary(path: str | Path) -> dict[str, Any]:
    """Read a ``summary.json`` written by :func:`write_artefacts`.

    Args:
        path: the ``summary.json`` file or the artefact directory containing it.

    Returns:
        The summary as a dict (keys: ``status`` (``"ok"`` or ``"failed"`` with ``error``),
        ``explainer``, ``outputs`` with ``top_features``, ``privacy``, ``n_explained``,
        ``explain_s``...).

    Raises:
        FileNotFoundError: when there is no summary at ``path``.
        ValueError: when the file is not a SHAP summary of a known schema.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"No SHAP summary at {p}; ShapSummary writes one to <log_dir>/shap/summary.json "
            "at the end of fit."
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("schema") != SUMMARY_SCHEMA:
        raise ValueError(
            f"{p} is not a SHAP summary of schema {SUMMARY_SCHEMA!r} "
            f"(found {data.get('schema') if isinstance(data, dict) else type(data).__name__!r})."
        )
    return data
