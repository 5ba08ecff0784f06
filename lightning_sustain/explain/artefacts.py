"""Write SHAP artefacts (plots, values, JSON and Markdown summaries) and read them back.

Layout of an artefact directory::

    shap_values.npz           values, base values, model output, names (+ data if allowed)
    summary.json              explainer, reasons, timing, top features per output, privacy
    summary.md                the same, short, for humans
    beeswarm_<output>.png     tabular / tensor inputs
    image_<output>.png        image inputs: per-pixel attribution overlay
    bar_<output>.png          mean |SHAP| per feature (per channel for images, per position
                              for tokens)
    tokens_<output>.png       token inputs: the tokens that matter most over all examples
    tokens.md                 token inputs: each example's tokens, its top tokens marked
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sustain.explain.core import ShapResult
from lightning_sustain.explain.plots import (
    bar_figure,
    beeswarm_figure,
    image_figure,
    token_bar_figure,
)
from lightning_sustain.explain.tokens import render_examples, token_namer, top_tokens

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
        tokens_md: ``tokens.md`` for token inputs, else ``None``.
    """

    directory: Path
    summary_json: Path
    summary_md: Path
    values_npz: Path | None
    plots: dict[str, Path] = field(default_factory=dict)
    tokens_md: Path | None = None


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


def _save(fig: Any, path: Path, tag: str, on_figure: FigureHook | None) -> None:
    # image overlays keep the tight bounding box (their panel grid has no fixed margins)
    fig.savefig(path, dpi=100, bbox_inches="tight" if tag.startswith("shap/image/") else None)
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
    token_names: Sequence[str] | Mapping[int, str] | None = None,
    max_token_examples: int = 20,
    context: dict[str, Any] | None = None,
    on_figure: FigureHook | None = None,
) -> ArtefactIndex:
    """Write plots, ``shap_values.npz``, ``summary.json`` and ``summary.md`` (+ ``tokens.md``).

    Args:
        result: what :func:`~lightning_sustain.explain.explain_model` returned.
        directory: where to write (created if missing).
        sensitive_data: the inputs came from protected data (e.g. encrypted shards). Raw
            feature values are then kept off disk: no ``data`` in the npz, beeswarm points
            not coloured by feature value, image plots without the input image, no token
            text (token plots and renderings are skipped; per-position bars remain).
        write_feature_values: write raw feature values even for sensitive data (opt-in).
        write_values: write ``shap_values.npz`` (per-row SHAP values). Note that for simple
            models per-row SHAP values can reveal inputs (linear: ``x = phi / w + E[x]``).
        top_n: features (and tokens) per output listed in the summaries.
        max_display: features shown in beeswarm and bar plots.
        max_image_rows: example images per overlay plot.
        token_names: vocabulary for token inputs (id -> text); default ``tok<id>``.
        max_token_examples: examples rendered in ``tokens.md``.
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
    labels = _feature_labels(result)
    n = result.n_explained
    namer = token_namer(token_names)
    token_tops: list[list[Any]] = []
    t0 = time.perf_counter()
    for k, name in enumerate(result.output_names):
        slug = _slug(name)
        flat = result.values[..., k].reshape(n, -1)
        if result.input_kind == "image":
            fig = image_figure(
                result.values[..., k], result.data if show_values else None, name, max_image_rows
            )
            plots[f"image/{name}"] = out / f"image_{slug}.png"
            _save(fig, plots[f"image/{name}"], f"shap/image/{name}", on_figure)
            channels = result.values[..., k].sum(axis=(2, 3))
            fig = bar_figure(
                channels,
                [f"channel_{c}" for c in range(channels.shape[1])],
                f"mean |SHAP| for {name}",
                max_display,
            )
        elif result.input_kind == "tokens":
            if show_values:
                tops = top_tokens(
                    [v[..., k] for v in result.values_list], result.data_list, namer, max_display
                )
                token_tops.append(tops)
                fig = token_bar_figure(
                    [t.token for t in tops],
                    [t.mean_abs_shap for t in tops],
                    f"tokens that matter most for {name}",
                )
                plots[f"tokens/{name}"] = out / f"tokens_{slug}.png"
                _save(fig, plots[f"tokens/{name}"], f"shap/tokens/{name}", on_figure)
            fig = bar_figure(flat, labels, f"mean |SHAP| per position for {name}", max_display)
        else:
            title = f"SHAP values for {name}"
            if not show_values:
                title += "\n(feature values withheld: sensitive data)"
            data = result.data.reshape(n, -1) if show_values else None
            fig = beeswarm_figure(flat, data, labels, title, max_display)
            plots[f"beeswarm/{name}"] = out / f"beeswarm_{slug}.png"
            _save(fig, plots[f"beeswarm/{name}"], f"shap/beeswarm/{name}", on_figure)
            fig = bar_figure(flat, labels, f"mean |SHAP| for {name}", max_display)
        plots[f"bar/{name}"] = out / f"bar_{slug}.png"
        _save(fig, plots[f"bar/{name}"], f"shap/bar/{name}", on_figure)
    tokens_md: Path | None = None
    if result.input_kind == "tokens" and show_values:
        tokens_md = out / "tokens.md"
        tokens_md.write_text(_tokens_markdown(result, namer, token_tops, max_token_examples))
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
            "feature_names": np.asarray(labels, dtype=str),
            "input_shape": np.asarray(result.input_shape, dtype=np.int64),
            "input_names": np.asarray(result.input_names, dtype=str),
        }
        if len(result.values_list) > 1:
            for input_name, values in zip(result.input_names, result.values_list, strict=True):
                arrays[f"values__{input_name}"] = values
        if show_values:
            arrays["data"] = result.data
            if len(result.data_list) > 1:
                for input_name, data in zip(result.input_names, result.data_list, strict=True):
                    arrays[f"data__{input_name}"] = data
        np.savez_compressed(npz_path, **arrays)

    importance = _importance(result)
    rel = result.additivity_relative_error
    outputs = []
    for k, name in enumerate(result.output_names):
        order = np.argsort(-importance[:, k])[:top_n]
        entry: dict[str, Any] = {
            "index": result.output_indices[k],
            "name": name,
            "base_value": float(result.base_values[k]),
            "output_std": result.output_std[k],
            "additivity_max_abs_error": result.additivity_max_abs_error[k],
            "additivity_relative_error": rel[k],
            "top_features": [
                {"name": labels[i], "mean_abs_shap": float(importance[i, k])} for i in order
            ],
            "plots": {
                kind.split("/")[0]: path.name
                for kind, path in plots.items()
                if kind.split("/", 1)[1] == name
            },
        }
        if token_tops:
            entry["top_tokens"] = [
                {
                    "token_id": t.token_id,
                    "token": t.token,
                    "mean_abs_shap": t.mean_abs_shap,
                    "occurrences": t.occurrences,
                }
                for t in token_tops[k][:top_n]
            ]
        outputs.append(entry)
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
            "images, no token text). SHAP values are derived from the data and can reveal "
            "inputs of simple models."
        )
    ok = all(r <= result.additivity_target for r in rel)
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "status": "ok",
        "created_unix_s": time.time(),
        "explainer": result.explainer,
        "explainer_requested": result.requested_explainer,
        "selection_reasons": result.selection_reasons,
        "deep_unsupported": result.deep_unsupported,
        "embedding_layer": result.embedding_layer,
        "input_kind": result.input_kind,
        "input_shape": list(result.input_shape),
        "inputs": [
            {"name": nm, "shape": list(v.shape[1:-1])}
            for nm, v in zip(result.input_names, result.values_list, strict=True)
        ],
        "n_background": result.n_background,
        "background": {
            "size": result.n_background,
            "seed": result.seed,
            "indices": result.background_indices,
        },
        "n_explained": result.n_explained,
        "n_requested": result.n_requested,
        "nsamples": result.settings.get("nsamples"),
        "additivity": {
            "max_abs_error": result.additivity_max_abs_error,
            "relative_to_output_std": rel,
            "target": result.additivity_target,
            "within_target": ok,
        },
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
            "tokens": tokens_md.name if tokens_md else None,
            "plots": sorted(p.name for p in plots.values()),
        },
        "versions": _versions(),
        "context": context or {},
    }
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    md_path = out / "summary.md"
    md_path.write_text(_markdown(summary))
    return ArtefactIndex(out, json_path, md_path, npz_path, plots, tokens_md)


def _tokens_markdown(
    result: ShapResult, namer: Any, token_tops: list[list[Any]], max_examples: int
) -> str:
    lines = ["# Token attributions", ""]
    lines.append(
        f"SHAP values per token at the embedding layer `{result.embedding_layer}` (summed over "
        "the embedding dimension); the top tokens of each example are marked "
        "**[token value]**."
    )
    lines.append("")
    for k, name in enumerate(result.output_names):
        lines += [f"## {name}", "", "Tokens that matter most over all examples:", ""]
        lines += [
            "| token | id | mean abs SHAP per example | occurrences |",
            "|---|---:|---:|---:|",
        ]
        for t in token_tops[k]:
            token = t.token.replace("|", "\\|")
            lines.append(f"| {token} | {t.token_id} | {t.mean_abs_shap:.4g} | {t.occurrences} |")
        lines.append("")
        lines += render_examples(
            [v[..., k] for v in result.values_list],
            result.data_list,
            result.input_names,
            namer,
            output_name=name,
            model_output=result.model_output[:, k],
            base_value=float(result.base_values[k]),
            max_examples=max_examples,
        )
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from lightning_sustain import __version__

    try:
        shap_version = version("shap")
    except PackageNotFoundError:
        shap_version = "not installed"
    return {"lightning_sustain": __version__, "shap": shap_version, "torch": torch.__version__}


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
    add = s["additivity"]
    worst = max(add["relative_to_output_std"], default=0.0)
    lines += [
        f"- Explained {s['n_explained']} rows against {s['n_background']} background rows "
        f"in {s['explain_s']:.2f} s (plots {s['plot_s']:.2f} s){budget}.",
        f"- Additivity: sum(SHAP) misses f(x) - E[f(x)] by at most {100 * worst:.3g} % of "
        f"std(f) (target {100 * add['target']:.3g} %"
        + ("" if add["within_target"] else "; **missed**")
        + ").",
        f"- Privacy: {s['privacy']['note']}",
        "",
    ]
    if s["files"].get("tokens"):
        lines += [f"Token renderings: [{s['files']['tokens']}]({s['files']['tokens']})", ""]
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
