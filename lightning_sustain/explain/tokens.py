"""Per-token attributions: the tokens that matter overall, and a text rendering per example."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TokenNamer", "render_examples", "token_namer", "top_tokens"]

TokenNamer = Callable[[int], str]


def token_namer(names: Sequence[str] | Mapping[int, str] | None) -> TokenNamer:
    """Map token ids to text: a vocabulary list/dict, or ``tok<id>`` when none is given."""

    def name(token_id: int) -> str:
        if names is not None:
            try:
                return str(names[token_id])  # type: ignore[index]
            except (IndexError, KeyError):
                pass
        return f"tok{token_id}"

    return name


@dataclass(frozen=True)
class TokenScore:
    """One token's importance over all explained examples."""

    token_id: int
    token: str
    mean_abs_shap: float
    occurrences: int


def top_tokens(
    values: Sequence[np.ndarray], ids: Sequence[np.ndarray], namer: TokenNamer, n: int
) -> list[TokenScore]:
    """The ``n`` tokens with the largest total |SHAP| per example, over all token inputs.

    Args:
        values: per token input, ``(N, T)`` SHAP values for one output.
        ids: per token input, ``(N, T)`` token ids (negative ids are ignored).
        namer: id -> text.
        n: how many tokens.

    Returns:
        Token scores, largest first; the score is ``sum |SHAP|`` over the token's
        occurrences divided by the number of examples.
    """
    totals: dict[int, float] = {}
    counts: dict[int, int] = {}
    n_rows = max((len(v) for v in values), default=0) or 1
    for vals, tok in zip(values, ids, strict=True):
        for token_id, value in zip(tok.reshape(-1), np.abs(vals).reshape(-1), strict=True):
            if token_id < 0:
                continue
            totals[int(token_id)] = totals.get(int(token_id), 0.0) + float(value)
            counts[int(token_id)] = counts.get(int(token_id), 0) + 1
    ranked = sorted(totals, key=lambda t: -totals[t])[:n]
    return [TokenScore(t, namer(t), totals[t] / n_rows, counts[t]) for t in ranked]


def render_examples(
    values: Sequence[np.ndarray],
    ids: Sequence[np.ndarray],
    input_names: Sequence[str],
    namer: TokenNamer,
    *,
    output_name: str,
    model_output: np.ndarray,
    base_value: float,
    max_examples: int = 20,
    top_per_example: int = 3,
) -> list[str]:
    """Markdown lines: each example's tokens, its top tokens marked ``**[tok +0.52]**``.

    Args:
        values: per token input, ``(N, T)`` SHAP values for one output.
        ids: per token input, ``(N, T)`` token ids.
        input_names: per token input, its name.
        namer: id -> text.
        output_name: the explained output.
        model_output: ``(N,)`` model output for that output.
        base_value: its base value.
        max_examples: examples rendered.
        top_per_example: tokens marked per example (over all its token inputs).

    Returns:
        Lines of Markdown.
    """
    lines: list[str] = []
    n = min(max_examples, len(model_output))
    for row in range(n):
        flat = [
            (abs(float(v[row, pos])), i, pos)
            for i, v in enumerate(values)
            for pos in range(v.shape[1])
        ]
        marked = {(i, pos) for _, i, pos in sorted(flat, reverse=True)[:top_per_example]}
        lines.append(
            f"**example {row}**, {output_name}: f(x) = {model_output[row]:.4g}, "
            f"base = {base_value:.4g}"
        )
        lines.append("")
        for i, (vals, tok) in enumerate(zip(values, ids, strict=True)):
            words = []
            for pos in range(vals.shape[1]):
                word = namer(int(tok[row, pos])).replace("|", "\\|").replace("*", "\\*")
                if (i, pos) in marked:
                    word = f"**[{word} {float(vals[row, pos]):+.3g}]**"
                words.append(word)
            lines.append(f"- `{input_names[i]}`: " + " ".join(words))
        lines.append("")
    return lines
