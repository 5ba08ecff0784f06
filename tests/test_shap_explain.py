"""SHAP explanation layer (lightning_sustain.explain): no Trainer involved."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import shap
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_sustain.explain import (
    check_deep_support,
    detached_copy,
    draw_samples,
    explain_model,
    extract_input,
    load_summary,
    select_explainer,
    snapshot_module,
    write_artefacts,
)

# ---------------------------------------------------------------- models under test


class Linear(nn.Module):
    """f(x) = w.x + b, output shape (N,)."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.lin = nn.Linear(len(w), 1)
        with torch.no_grad():
            self.lin.weight.copy_(w[None])
            self.lin.bias.fill_(b)

    def forward(self, x):
        return self.lin(x).squeeze(-1)


class SiluNormReused(nn.Module):
    """SiLU, LayerNorm and one ReLU module used twice, plus Dropout (mode must survive)."""

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.silu = nn.SiLU()
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.act(self.fc1(x))
        h = self.act(self.fc2(h))  # the same ReLU module, again
        return self.head(self.drop(self.silu(self.norm(h))))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(4)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 5))

    def forward(self, x):
        return self.head(self.features(x))


class Blocks(nn.Module):
    """Residual MLP blocks in a ModuleList, with a functional ReLU in forward."""

    def __init__(self, d: int = 14) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        for block in self.blocks:
            x = x + F.relu(block(x))
        return self.out(x)


class Mlp(nn.Module):
    def __init__(self, d: int = 20, k: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                                 nn.Linear(32, k))  # fmt: skip

    def forward(self, x):
        return self.net(x)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- exactness and additivity


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.01, 100.0),
    n_bg=st.integers(1, 30),
)
def test_linear_default_is_exact_analytic_shap(d, seed, scale, n_bg):
    """Default settings on a linear model: phi_i = w_i (x_i - E[x_i]) within 1e-3 relative."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g) * scale
    model = Linear(w, b=float(torch.randn(1, generator=g)))
    bg = torch.randn(n_bg, d, generator=g) * 2 + 1
    x = torch.randn(7, d, generator=g)
    res = explain_model(model, bg, x)
    analytic = (w.double() * (x.double() - bg.double().mean(0))).numpy()
    tol = 1e-3 * max(np.abs(analytic).max(), 1e-6 * scale)
    assert np.abs(res.values[..., 0] - analytic).max() <= tol
    assert max(res.additivity_relative_error) <= 0.01


@pytest.mark.parametrize("explainer", ["deep", "gradient", "permutation"])
def test_linear_model_matches_analytic_shap(explainer):
    w = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, -2.5, 1.5, 0.25, -0.75, 1.0, 2.2, -0.3])
    model = Linear(w, b=0.7)
    bg = torch.randn(50, 12) * 2 + 1
    x = torch.randn(30, 12)
    res = explain_model(model, bg, x, explainer=explainer)
    assert res.explainer == explainer
    assert res.values.shape == (30, 12, 1)  # (N,) output handled as one output
    analytic = (w * (x - bg.mean(0))).numpy()
    np.testing.assert_allclose(res.values[..., 0], analytic, atol=1e-4)
    fx = model(x).detach().numpy()
    np.testing.assert_allclose(res.base_values[0], model(bg).mean().item(), rtol=1e-5)
    np.testing.assert_allclose(res.values[..., 0].sum(1), fx - res.base_values[0], atol=1e-4)
    assert max(res.additivity_max_abs_error) < 1e-4


_ACTS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "layernorm": lambda: nn.LayerNorm(8),  # no DeepLIFT rule: gradient or permutation
}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d=st.sampled_from([3, 8, 14]),
    act=st.sampled_from(sorted(_ACTS)),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_default_additivity_within_one_percent_on_small_mlps(d, act, k, seed):
    """Whatever auto picks, sum(phi) = f(x) - E[f] within 1 % of std(f), checked here."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 8), _ACTS[act](), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, k))  # fmt: skip
    bg, x = torch.randn(12, d), torch.randn(6, d)
    res = explain_model(model, bg, x, top_k_outputs=None)
    with torch.no_grad():
        fx, fbg = model(x).double(), model(bg).double()
    target = (fx - fbg.mean(0)).numpy()
    std = torch.cat([fbg, fx]).std(0, unbiased=False).numpy()
    err = np.abs(res.values.astype(np.float64).sum(1) - target).max(0)
    assert (err <= 0.01 * std + 1e-6).all(), (res.explainer, err / std)
    np.testing.assert_allclose(res.additivity_max_abs_error, err, rtol=1e-3, atol=1e-6)
    if act != "layernorm":
        assert res.explainer == "deep"  # every module has a rule: the exact method


def test_gradient_refines_quadrature_until_additive():
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))
    bg, x = torch.randn(10, 6), torch.randn(8, 6)
    fixed = explain_model(model, bg, x, explainer="gradient", nsamples=2)
    adaptive = explain_model(model, bg, x, explainer="gradient")
    assert max(adaptive.additivity_relative_error) <= 0.01
    assert max(fixed.additivity_relative_error) > max(adaptive.additivity_relative_error)
    points = adaptive.settings["nsamples"]["quadrature_points_per_path"]
    assert points["min"] >= 8 and points["max"] <= 256
    assert adaptive.settings["nsamples"]["references_per_row"] == 10


def test_deep_equals_shaps_own_deep_explainer():
    model = Mlp().eval()
    bg, x = torch.randn(40, 20), torch.randn(25, 20)
    ours = explain_model(model, bg, x, explainer="deep", top_k_outputs=None, batch_size=500)
    ref = shap.DeepExplainer(detached_copy(model), bg).shap_values(x)
    assert ours.values.shape == ref.shape == (25, 20, 4)
    np.testing.assert_allclose(ours.values, ref, atol=1e-5)


def test_deep_equals_shap_on_cnn_with_maxpool_and_batchnorm():
    model = SmallCNN().eval()
    bg, x = torch.randn(10, 1, 8, 8), torch.randn(4, 1, 8, 8)
    ours = explain_model(model, bg, x, explainer="deep", top_k_outputs=None)
    assert ours.explainer == "deep"
    ref = shap.DeepExplainer(detached_copy(model), bg).shap_values(x, check_additivity=False)
    np.testing.assert_allclose(ours.values, ref, atol=1e-4)
    assert max(ours.additivity_relative_error) < 1e-4


def test_gradient_agrees_with_shaps_gradient_explainer():
    model = Mlp(k=2).eval()
    bg, x = torch.randn(40, 20), torch.randn(2, 20)
    ours = explain_model(model, bg, x, explainer="gradient")
    ref = shap.GradientExplainer(detached_copy(model), bg).shap_values(x, nsamples=2000, rseed=3)
    # shap's Monte Carlo estimate of the same expectation; ours is the quadrature
    scale = np.abs(ref).max()
    assert np.abs(ours.values - ref).max() < 0.15 * scale
    assert np.abs(ours.values.sum(1) - ref.sum(1)).max() < 0.1 * np.abs(ref.sum(1)).max()


# ---------------------------------------------------------------- troublesome models


@pytest.mark.parametrize(
    ("factory", "shape", "expected", "blockers"),
    [
        (SiluNormReused, (12,), "gradient", ["nn.LayerNorm"]),
        (SmallCNN, (1, 8, 8), "deep", []),
        (Blocks, (14,), "gradient", ["functional op `relu`"]),
    ],
)
def test_models_explained_artefacts_written_and_model_untouched(
    tmp_path, factory, shape, expected, blockers
):
    model = factory()
    model.train()
    model.drop.eval() if hasattr(model, "drop") else None  # a mixed-mode model
    before = snapshot_module(model)
    bg, x = torch.randn(16, *shape), torch.randn(12, *shape)
    res = explain_model(model, bg, x)
    assert res.explainer == expected
    assert max(res.additivity_relative_error) <= 0.01
    text = " ".join(res.selection_reasons + res.deep_unsupported)
    for blocker in blockers:
        assert blocker in text
    assert np.isfinite(res.values).all()
    assert snapshot_module(model).differences(before) == []
    index = write_artefacts(res, tmp_path / "shap")
    names = {p.name for p in index.directory.iterdir()}
    assert {"summary.json", "summary.md", "shap_values.npz"} <= names
    for out in res.output_names:
        kind = "image" if len(shape) == 3 else "beeswarm"
        assert f"{kind}_{out}.png" in names and f"bar_{out}.png" in names
        assert (index.directory / f"{kind}_{out}.png").stat().st_size > 1000
    summary = load_summary(index.directory)
    assert summary["explainer"] == expected
    assert len(summary["outputs"]) == len(res.output_names)
    assert all(
        len(o["top_features"])
        == min(10, res.mean_abs().shape[0] if len(shape) == 1 else shape[1] * shape[2])
        for o in summary["outputs"]
    )
    if factory is SmallCNN:  # every module has a rule: deep, exactly additive
        assert any("every module of the model has a DeepLIFT rule" in r for r in
                   res.selection_reasons)  # fmt: skip
        assert max(res.additivity_max_abs_error) < 1e-4


def test_deep_support_reports_each_problem():
    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.act = nn.ReLU(inplace=True)
            self.unused = nn.GELU()  # never called: must not be reported

        def forward(self, x):
            h = self.act(self.fc(x))
            return (h * h).sum(1, keepdim=True) + torch.sigmoid(x).sum(1, keepdim=True)

    support = check_deep_support(Inplace(), torch.randn(2, 6))
    text = " ".join(support.reasons)
    assert not support.supported
    assert "inplace=True" in text
    assert "`mul` of two input-dependent tensors" in text
    assert "functional op `sigmoid`" in text
    assert "unused" not in text
    assert check_deep_support(Mlp(), torch.randn(2, 20)).supported


def test_deep_additivity_safety_net_switches_to_gradient(caplog):
    class Linear(nn.Linear):  # shadows a name DeepExplainer treats as linear
        def forward(self, x):
            return torch.tanh(super().forward(x)) * 3

    model = nn.Sequential(Linear(20, 8), nn.ReLU(), nn.Linear(8, 2))
    with caplog.at_level("WARNING"):
        res = explain_model(model, torch.randn(20, 20), torch.randn(6, 20), explainer="deep")
    assert res.explainer == "gradient"
    assert "do not sum to the model output" in caplog.text
    assert any("switched to expected gradients" in r for r in res.selection_reasons)


def test_forced_deep_on_unsupported_model_falls_back_with_reason(caplog):
    with caplog.at_level("WARNING"):
        choice = select_explainer(SiluNormReused().eval(), torch.randn(4, 12), "deep")
    assert choice.name == "gradient"
    assert "nn.LayerNorm" in caplog.text


def test_no_gradients_uses_permutation():
    class Rounded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 2)

        def forward(self, x):
            return torch.round(self.fc(x) * 4)

    res = explain_model(Rounded(), torch.randn(20, 20), torch.randn(5, 20), npermutations=2)
    assert res.explainer == "permutation"
    assert "gradient is zero" in res.selection_reasons[0]
    assert max(res.additivity_max_abs_error) < 1e-6  # permutation is always additive


def test_small_tabular_auto_uses_permutation_when_deep_is_not_exact():
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    res = explain_model(model, torch.randn(20, 5), torch.randn(4, 5), npermutations=3)
    assert res.explainer == "permutation"
    assert "5 <= 10 features" in res.selection_reasons[0]
    assert max(res.additivity_relative_error) < 1e-6
    # with a DeepLIFT rule for every module, deep wins even for few features
    assert explain_model(Mlp(d=5, k=2), torch.randn(20, 5), torch.randn(4, 5)).explainer == "deep"


# ---------------------------------------------------------------- outputs, RNG, budget, modes


def test_top_k_outputs_picks_most_predicted_classes():
    model = nn.Linear(20, 6)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.0, 9.0, 0.0, 0.0, 5.0, 0.0]))
    res = explain_model(model, torch.randn(10, 20), torch.randn(8, 20), top_k_outputs=2,
                        output_names=[f"c{i}" for i in range(6)], explainer="gradient",
                        nsamples=2)  # fmt: skip
    assert res.output_indices[0] == 1
    assert res.output_names[0] == "c1"
    assert res.values.shape == (8, 20, 2)
    res = explain_model(model, torch.randn(10, 20), torch.randn(8, 20), outputs=[5, 0],
                        explainer="gradient", nsamples=2)  # fmt: skip
    assert res.output_indices == [5, 0]


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


@pytest.mark.parametrize("explainer", ["gradient", "permutation", "deep"])
def test_global_rng_state_restored(explainer):
    model, bg, x = Mlp(), torch.randn(10, 20), torch.randn(4, 20)
    _seed_all(5)
    expected = _draws()
    _seed_all(5)
    explain_model(model, bg, x, explainer=explainer, nsamples=4, npermutations=1)
    assert _draws() == expected


def test_runs_under_inference_mode_and_keeps_it():
    model = Mlp()
    bg, x = torch.randn(10, 20), torch.randn(4, 20)
    with torch.inference_mode():
        inf_bg, inf_x = bg.clone(), x.clone()
        res = explain_model(model, inf_bg, inf_x, explainer="gradient", nsamples=4)
        assert torch.is_inference_mode_enabled()
    assert np.abs(res.values).sum() > 0


def test_time_budget_stops_early_and_says_so():
    model = Mlp(k=2)
    res = explain_model(model, torch.randn(50, 20), torch.randn(400, 20), explainer="permutation",
                        npermutations=5, time_budget_s=0.05)  # fmt: skip
    assert res.budget_exhausted
    assert 1 <= res.n_explained < 400
    assert res.n_requested == 400


def test_results_are_reproducible():
    model, bg, x = Mlp(d=6), torch.randn(10, 6), torch.randn(5, 6)
    a = explain_model(model, bg, x, explainer="permutation", npermutations=2, seed=7)
    b = explain_model(model, bg, x, explainer="permutation", npermutations=2, seed=7)
    np.testing.assert_array_equal(a.values, b.values)
    # the gradient explainers do not sample at all: the seed does not matter
    g1 = explain_model(model, bg, x, explainer="gradient", seed=1)
    g2 = explain_model(model, bg, x, explainer="gradient", seed=2)
    np.testing.assert_array_equal(g1.values, g2.values)


# ---------------------------------------------------------------- privacy and artefacts


def test_sensitive_data_keeps_feature_values_off_disk(tmp_path):
    x = torch.randn(8, 12) * 100 + 12345.0  # recognisable values
    res = explain_model(SiluNormReused(), torch.randn(10, 12), x, nsamples=4,
                        feature_names=[f"f{i}" for i in range(12)])  # fmt: skip
    private = write_artefacts(res, tmp_path / "private", sensitive_data=True)
    with np.load(private.values_npz) as npz:
        assert "data" not in npz.files
        assert list(npz["feature_names"]) == [f"f{i}" for i in range(12)]
    summary = load_summary(private.directory)
    assert summary["privacy"] == {
        "sensitive_data": True,
        "feature_values_written": False,
        "note": summary["privacy"]["note"],
    }
    assert "not written" in (private.directory / "summary.md").read_text()
    opted = write_artefacts(res, tmp_path / "opted", sensitive_data=True, write_feature_values=True)
    with np.load(opted.values_npz) as npz:
        np.testing.assert_array_equal(npz["data"], x.numpy())
    assert load_summary(opted.directory)["privacy"]["feature_values_written"] is True


def test_npz_contents(tmp_path):
    res = explain_model(Mlp(), torch.randn(10, 20), torch.randn(6, 20), explainer="deep")
    index = write_artefacts(res, tmp_path)
    with np.load(index.values_npz) as npz:
        assert npz["values"].shape == (6, 20, 3)
        assert npz["base_values"].shape == (3,)
        assert list(npz["output_names"]) == res.output_names
        np.testing.assert_allclose(
            npz["values"].sum(1), npz["model_output"] - npz["base_values"], atol=1e-4
        )


def test_load_summary_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No SHAP summary"):
        load_summary(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="not a SHAP summary"):
        load_summary(tmp_path / "summary.json")


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    model, bg = Mlp(), torch.randn(10, 20)
    with pytest.raises(ValueError, match="Unknown explainer 'kernel'"):
        explain_model(model, bg, bg, explainer="kernel")
    with pytest.raises(ValueError, match=r"shape \(20,\) but explained rows have shape \(21,\)"):
        explain_model(model, bg, torch.randn(3, 21))
    with pytest.raises(ValueError, match="Got 3 feature names for inputs with 20 elements"):
        explain_model(model, bg, bg, feature_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="Got 2 output names for a model with 4 outputs"):
        explain_model(model, bg, bg, output_names=["a", "b"])
    with pytest.raises(ValueError, match=r"outputs=\[7\]"):
        explain_model(model, bg, bg, outputs=[7])

    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="returned tuple"):
        explain_model(TupleOut(), bg, bg)


def test_draw_samples_and_extract_input():
    ds = torch.utils.data.TensorDataset(torch.arange(100.0)[:, None], torch.zeros(100))
    loader = torch.utils.data.DataLoader(ds, batch_size=7, shuffle=True)
    state = torch.get_rng_state()
    a, idx = draw_samples(loader, 10, seed=0)
    b, _ = draw_samples(loader, 10, seed=0)
    c, _ = draw_samples(loader, 95, seed=1, exclude=idx)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and a.shape == (10, 1)
    assert set(c[:, 0].tolist()).isdisjoint(set(a[:, 0].tolist())) and len(c) == 90

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(50):
                yield {"features": torch.tensor([float(i)]), "y": 0}

    streamed, none = draw_samples(torch.utils.data.DataLoader(Stream(), batch_size=8), 5, seed=0)
    assert none is None and streamed.shape == (5, 1)
    with pytest.raises(TypeError, match="set input_key"):
        extract_input({"a": torch.zeros(1)})
    assert extract_input({"a": torch.ones(2)}, "a").sum() == 2


def test_time_budget_also_bounds_the_quadrature_refinement():
    model = nn.Sequential(nn.Linear(20, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 2))
    res = explain_model(model, torch.randn(50, 20), torch.randn(400, 20), time_budget_s=0.2)
    assert res.explainer == "gradient"
    assert res.budget_exhausted and 1 <= res.n_explained < 400
    assert res.elapsed_s < 0.2 + 5.0  # one chunk (and its refinement) may finish past it
