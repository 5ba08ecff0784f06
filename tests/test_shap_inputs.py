"""Several inputs (tuple/dict), token ids at the embedding layer, sequence outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_sustain.explain import (
    draw_samples,
    explain_model,
    extract_inputs,
    load_summary,
    write_artefacts,
)


class TwoLinear(nn.Module):
    """f(a, b) = wa.a + wb.b: analytic SHAP per input."""

    def __init__(self, da: int, db: int) -> None:
        super().__init__()
        self.fa = nn.Linear(da, 1)
        self.fb = nn.Linear(db, 1, bias=False)

    def forward(self, num, cat):
        return (self.fa(num) + self.fb(cat)).squeeze(-1)


@pytest.mark.parametrize("style", ["tuple", "dict"])
@pytest.mark.parametrize("explainer", ["auto", "gradient", "permutation"])
def test_multi_input_linear_is_analytic_per_input(style, explainer):
    torch.manual_seed(0)
    model = TwoLinear(3, 5)
    bg = (torch.randn(20, 3), torch.randn(20, 5) + 2)
    x = (torch.randn(6, 3), torch.randn(6, 5))
    if style == "dict":  # called as model(num=..., cat=...)
        bg, x = (
            dict(zip(("num", "cat"), bg, strict=True)),
            dict(zip(("num", "cat"), x, strict=True)),
        )
    res = explain_model(model, bg, x, explainer=explainer)
    assert len(res.values_list) == 2
    assert res.values_list[0].shape == (6, 3, 1) and res.values_list[1].shape == (6, 5, 1)
    xs = list(x.values()) if isinstance(x, dict) else list(x)
    bgs = list(bg.values()) if isinstance(bg, dict) else list(bg)
    for values, layer, xi, bi in zip(res.values_list, (model.fa, model.fb), xs, bgs, strict=True):
        analytic = (layer.weight[0] * (xi - bi.mean(0))).detach().numpy()
        np.testing.assert_allclose(values[..., 0], analytic, atol=1e-4)
    expected_names = ["num", "cat"] if style == "dict" else ["input_0", "input_1"]
    assert res.input_names == expected_names
    assert res.feature_names[0] == f"{expected_names[0]}[0]" and len(res.feature_names) == 8


class TwoInMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, a, b):
        return self.head(self.a(a) + self.b(b))


def test_multi_input_mlp_deep_is_additive_and_written(tmp_path):
    torch.manual_seed(0)
    model = TwoInMlp()
    bg, x = (torch.randn(10, 4), torch.randn(10, 3)), (torch.randn(5, 4), torch.randn(5, 3))
    res = explain_model(model, bg, x, input_names=["left", "right"])
    assert res.explainer == "deep" and res.input_kind == "multi"
    assert max(res.additivity_relative_error) < 1e-5
    index = write_artefacts(res, tmp_path)
    with np.load(index.values_npz) as npz:
        assert npz["values__left"].shape == (5, 4, 2) and npz["values__right"].shape == (5, 3, 2)
        assert npz["values"].shape == (5, 7, 2)
    summary = load_summary(tmp_path)
    assert [i["name"] for i in summary["inputs"]] == ["left", "right"]


class Bag(nn.Module):
    """f(ids) = w . mean_t E[ids_t] + b: linear in the embeddings."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1)).squeeze(-1)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vocab=st.integers(3, 30), dim=st.integers(1, 8), length=st.integers(1, 9),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_token_attributions_at_embedding_are_analytic(vocab, dim, length, seed):
    torch.manual_seed(seed)
    model = Bag(vocab, dim)
    bg, x = torch.randint(0, vocab, (7, length)), torch.randint(0, vocab, (4, length))
    res = explain_model(model, bg, x)
    assert res.explainer == "embedding_gradient" and res.embedding_layer == "emb"
    assert res.input_kind == "tokens" and res.values.shape == (4, length, 1)
    emb, w = model.emb.weight.detach(), model.out.weight.detach()[0]
    analytic = ((emb[x] - emb[bg].mean(0)) @ w / length).numpy()
    tol = 1e-3 * max(np.abs(analytic).max(), 1e-6)
    assert np.abs(res.values[..., 0] - analytic).max() <= tol
    np.testing.assert_array_equal(res.data_list[0], x.numpy())


class SeqLM(nn.Module):
    """A causal toy LM returning (N * T, V) log-probs like lightning's demo Transformer."""

    def __init__(self, vocab: int = 12, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids, ctx):
        h = torch.tanh(self.mix(self.emb(ids).cumsum(1)) + self.emb(ctx))
        return torch.log_softmax(self.out(h), -1).reshape(-1, self.out.out_features)


def test_sequence_outputs_two_token_inputs_and_token_artefacts(tmp_path):
    torch.manual_seed(0)
    model = SeqLM()
    bg = (torch.randint(0, 12, (6, 5)), torch.randint(0, 12, (6, 5)))
    x = (torch.randint(0, 12, (4, 5)), torch.randint(0, 12, (4, 5)))
    res = explain_model(model, bg, x, top_k_outputs=2)
    assert res.explainer == "embedding_gradient"
    assert res.input_names == ["input_0", "input_1"]  # one embedding call per token input
    assert res.values_list[0].shape == (4, 5, 2)
    assert max(res.additivity_relative_error) <= 0.01
    with torch.no_grad():
        last = model(*x).view(4, 5, -1)[:, -1]
    np.testing.assert_allclose(res.model_output, last[:, res.output_indices].double(), atol=1e-5)
    mean = explain_model(model, bg, x, top_k_outputs=2, sequence_reduction="mean")
    with torch.no_grad():
        avg = model(*x).view(4, 5, -1).mean(1)
    np.testing.assert_allclose(mean.model_output, avg[:, mean.output_indices].double(), atol=1e-5)

    vocab = [f"word{i}" for i in range(12)]
    index = write_artefacts(res, tmp_path, token_names=vocab)
    text = index.tokens_md.read_text()
    assert "**example 0**" in text and "**[word" in text
    first = vocab[int(x[0][0, 0])]
    assert first in text
    for name in res.output_names:
        assert (tmp_path / f"tokens_{name}.png").stat().st_size > 1000
        assert (tmp_path / f"bar_{name}.png").stat().st_size > 1000
    summary = load_summary(tmp_path)
    top = summary["outputs"][0]["top_tokens"]
    assert top and all(t["token"].startswith("word") for t in top)
    assert top == sorted(top, key=lambda t: -t["mean_abs_shap"])
    assert summary["files"]["tokens"] == "tokens.md"
    # sensitive data: no token text, no token plot
    private = write_artefacts(res, tmp_path / "private", token_names=vocab, sensitive_data=True)
    assert private.tokens_md is None and not list((tmp_path / "private").glob("tokens_*"))


def test_bad_embedding_layer_name():
    with pytest.raises(ValueError, match="embedding_layer='nope' is not a submodule"):
        explain_model(Bag(5, 2), torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (2, 4)),
                      embedding_layer="nope")  # fmt: skip


def test_extract_and_draw_several_inputs():
    batch = {"num": torch.ones(4, 3), "cat": torch.zeros(4, 2), "y": torch.ones(4)}
    out = extract_inputs(batch, input_keys=["num", "cat"])
    assert list(out) == ["num", "cat"]
    assert isinstance(extract_inputs((torch.ones(2), torch.zeros(2)), input_keys=[1, 0]), tuple)
    with pytest.raises(ValueError, match="not both"):
        extract_inputs(batch, input_key="num", input_keys=["cat"])
    ds = torch.utils.data.TensorDataset(torch.arange(40.0)[:, None], torch.arange(40)[:, None])
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    drawn, idx = draw_samples(loader, 5, seed=0, input_keys=[0, 1])
    assert isinstance(drawn, tuple) and drawn[0].shape == (5, 1)
    assert torch.equal(drawn[0][:, 0].long(), drawn[1][:, 0]) and len(idx) == 5
