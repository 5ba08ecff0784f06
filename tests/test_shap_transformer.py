"""Lightning's demo Transformer explained per token (examples/shap_transformer.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from examples.shap_transformer import run, synthetic_tokens
from lightning_sustain.explain import load_summary


def test_synthetic_tokens_follow_the_rule():
    inputs, decoder_inputs, targets = synthetic_tokens(50, length=8, vocab=16, seed=3)
    assert inputs.shape == decoder_inputs.shape == targets.shape == (50, 8)
    keys = (inputs >= 1) & (inputs <= 4)
    assert (keys.sum(1) == 1).all()  # one key per sequence, among filler words
    assert (targets[:, -1] == inputs[keys]).all()  # the next token repeats the key
    assert (decoder_inputs[:, 0] == 0).all() and (decoder_inputs[:, 1:] == targets[:, :-1]).all()


def test_demo_transformer_token_attributions(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(tmp_path, epochs=1, num_samples=3, num_background=3, n_train=256)
    out = Path(summary["directory"])
    assert summary["status"] == "ok"
    assert summary["explainer"] == "embedding_gradient"
    assert summary["embedding_layer"] == "model.embedding"
    assert summary["input_kind"] == "tokens"
    # both forward arguments are token ids through the shared embedding: one array each
    assert [i["name"] for i in summary["inputs"]] == ["input_0", "input_1"]
    assert all(i["shape"] == [8] for i in summary["inputs"])
    assert len(summary["outputs"]) == 3
    with np.load(out / "shap_values.npz") as npz:
        assert npz["values__input_0"].shape == (3, 8, 3)
        total = npz["values__input_0"].sum(1) + npz["values__input_1"].sum(1)
        err = np.abs(total - (npz["model_output"] - npz["base_values"])).max(0)
    np.testing.assert_allclose(err, summary["additivity"]["max_abs_error"], rtol=1e-3, atol=1e-6)
    rel = summary["additivity"]["relative_to_output_std"]
    assert summary["additivity"]["within_target"] == (max(rel) <= 0.01)
    missed = any("ShapSummary: SHAP values miss" in str(w.message) for w in caught)
    assert missed == (not summary["additivity"]["within_target"])
    assert summary["background"]["size"] == 3 and len(summary["background"]["indices"]) == 3
    vocab = {"<bos>"} | {f"k{i}" for i in range(1, 5)} | {f"w{i}" for i in range(5, 16)}
    assert {o["name"] for o in summary["outputs"]} <= vocab
    text = (out / "tokens.md").read_text()
    assert text.count("**example") == 3 * 3 and "**[" in text
    for o in summary["outputs"]:
        assert o["top_tokens"] and (out / o["plots"]["tokens"]).stat().st_size > 1000
    assert load_summary(out)["files"]["tokens"] == "tokens.md"
