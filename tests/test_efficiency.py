"""Efficiency figures: FLOPs counted with FlopCounterMode against analytic counts, and the
figures' algebra as properties."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sustain.energy.efficiency import (
    StepFlops,
    count_step_flops,
    efficiency_figures,
)


def mlp(widths: list[int], bias: bool = True) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        if i:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(a, b, bias=bias))
    return torch.nn.Sequential(*layers)


def analytic_mlp_flops(batch: int, widths: list[int], train: bool) -> int:
    """2*B*in*out per Linear forward; backward: the weight gradient of every layer and the
    input gradient of every layer but the first (the batch needs no gradient)."""
    per_layer = [2 * batch * a * b for a, b in zip(widths, widths[1:], strict=False)]
    forward = sum(per_layer)
    if not train:
        return forward
    return forward + sum(per_layer) + sum(per_layer[1:])


def test_linear_forward_is_2_b_in_out_and_training_adds_the_weight_gradient() -> None:
    b, n_in, n_out = 32, 64, 16
    layer = torch.nn.Linear(n_in, n_out)
    x = torch.randn(b, n_in)
    inference = count_step_flops(layer, x, train=False)
    assert inference.flops_per_step == 2 * b * n_in * n_out
    assert inference.samples_per_step == b and inference.train is False
    train = count_step_flops(layer, x, train=True)
    assert train.flops_per_step == 2 * 2 * b * n_in * n_out
    # an input that needs a gradient (a layer inside a network): forward x3
    assert count_step_flops(layer, x.requires_grad_(True), train=True).flops_per_step == 3 * (
        2 * b * n_in * n_out
    )


@given(
    batch=st.integers(1, 16),
    widths=st.lists(st.integers(1, 24), min_size=2, max_size=5),
    train=st.booleans(),
    bias=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_mlp_flops_match_the_analytic_count(batch, widths, train, bias) -> None:
    model = mlp(widths, bias=bias)
    counted = count_step_flops(model, torch.randn(batch, widths[0]), train=train)
    assert counted.flops_per_step == analytic_mlp_flops(batch, widths, train)


def test_conv2d_forward_matches_the_analytic_count() -> None:
    b, c_in, c_out, k, hw = 4, 3, 8, 3, 10
    conv = torch.nn.Conv2d(c_in, c_out, k, padding=1)
    counted = count_step_flops(conv, torch.randn(b, c_in, hw, hw), train=False)
    assert counted.flops_per_step == 2 * b * c_out * hw * hw * c_in * k * k


def test_counting_matches_lightnings_measure_flops() -> None:
    from lightning.fabric.utilities.throughput import measure_flops

    model = mlp([12, 20, 7])
    x = torch.randn(9, 12)
    ours = count_step_flops(model, x, train=True, loss_fn=lambda out: out.sum())
    theirs = measure_flops(model, lambda: model(x), lambda out: out.sum())
    assert ours.flops_per_step == theirs


def test_counting_leaves_grads_buffers_mode_and_rng_as_they_were() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2)
    )
    model.train()
    x = torch.randn(5, 6)
    running = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    count_step_flops(model, x, train=True)
    assert all(p.grad is None for p in model.parameters())
    # gradients accumulated before the count are kept as they were
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    x_needing_grad = x.clone().requires_grad_(True)
    count_step_flops(model, x_needing_grad, train=True)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    assert x_needing_grad.grad is None
    assert torch.equal(model[1].running_mean, running)
    assert int(model[1].num_batches_tracked) == 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    model.eval()
    count_step_flops(model, x, train=False)
    assert not model.training


def test_meta_device_model_is_counted_without_memory() -> None:
    with torch.device("meta"):
        model = mlp([4096, 4096, 4096])
        x = torch.empty(64, 4096)
    counted = count_step_flops(model, x, train=True)
    assert counted.flops_per_step == analytic_mlp_flops(64, [4096, 4096, 4096], True)


def test_inputs_as_tuple_and_mapping_and_explicit_tokens() -> None:
    class Embedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.head = torch.nn.Linear(8, 50)

        def forward(self, input_ids, scale=1.0):
            return self.head(self.emb(input_ids)) * scale

    model = Embedder()
    ids = torch.randint(0, 50, (3, 7))
    by_tuple = count_step_flops(model, (ids, 2.0), train=False, tokens=ids.numel())
    by_map = count_step_flops(model, {"input_ids": ids}, train=False, tokens=ids.numel())
    assert by_tuple.flops_per_step == by_map.flops_per_step == 2 * 3 * 7 * 8 * 50
    assert by_map.tokens_per_step == 21 and by_map.samples_per_step == 3


def test_method_states_how_the_count_was_made() -> None:
    counted = count_step_flops(mlp([3, 2]), torch.randn(4, 3), train=True)
    assert "FlopCounterMode" in counted.method
    assert "forward and backward" in counted.method
    assert "sample batch of 4 samples" in counted.method
    inference = count_step_flops(mlp([3, 2]), torch.randn(4, 3), train=False)
    assert "forward only" in inference.method


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: count_step_flops(mlp([2, 2]), torch.randn(1, 2), samples=-1), "samples"),
        (lambda: count_step_flops(mlp([2, 2]), torch.randn(1, 2), tokens=1.5), "tokens"),
        (lambda: count_step_flops(mlp([2, 2]).requires_grad_(False), torch.randn(1, 2)), "train"),
        (lambda: efficiency_figures(10, steps=1, energy_j=1.0), "method"),
        (lambda: efficiency_figures(-1, steps=1, energy_j=1.0, method="m"), "flops"),
        (lambda: efficiency_figures(10, steps=-2, energy_j=1.0, method="m"), "steps"),
        (lambda: efficiency_figures(10, steps=1, energy_j=math.nan, method="m"), "energy_j"),
        (lambda: efficiency_figures(10, steps=1, energy_j=-1.0, method="m"), "energy_j"),
        (
            lambda: efficiency_figures(10, steps=1, energy_j=1.0, duration_s=math.inf, method="m"),
            "duration_s",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@given(
    flops=st.integers(1, 10**16),
    steps=st.integers(1, 10**6),
    energy_j=st.floats(1e-3, 1e9),
    duration_s=st.floats(1e-3, 1e7),
    samples_per_step=st.integers(1, 4096),
    tokens_per_step=st.one_of(st.none(), st.integers(1, 10**6)),
)
@settings(max_examples=200, deadline=None)
def test_figures_are_consistent(
    flops, steps, energy_j, duration_s, samples_per_step, tokens_per_step
) -> None:
    step = StepFlops(flops, True, samples_per_step, tokens_per_step, "m")
    fig = efficiency_figures(
        step, steps=steps, energy_j=energy_j, duration_s=duration_s, energy_provenance="counter"
    )
    tflop = flops * steps / 1e12
    assert fig.total_tflop == pytest.approx(tflop)
    assert fig.j_per_tflop == pytest.approx(energy_j / tflop)
    # achieved TFLOP/s per watt of mean power is TFLOP per joule
    assert fig.tflops_per_s_per_w == pytest.approx(
        fig.achieved_tflops_per_s / fig.mean_power_w, rel=1e-9
    )
    assert fig.tflops_per_s_per_w * fig.j_per_tflop == pytest.approx(1.0)
    assert fig.samples == steps * samples_per_step
    assert fig.samples_per_j == pytest.approx(fig.samples / energy_j)
    if tokens_per_step is None:
        assert fig.tokens is None and fig.tokens_per_j is None
    else:
        assert fig.tokens_per_j == pytest.approx(steps * tokens_per_step / energy_j)
    # twice the energy for the same work: twice the J/TFLOP, half the tokens/J
    double = efficiency_figures(step, steps=steps, energy_j=2 * energy_j, duration_s=duration_s)
    assert double.j_per_tflop == pytest.approx(2 * fig.j_per_tflop)
    assert double.samples_per_j == pytest.approx(fig.samples_per_j / 2)


def test_zero_denominators_give_none_not_inf_and_dict_is_json() -> None:
    fig = efficiency_figures(0, steps=0, energy_j=0.0, method="counted by hand")
    assert fig.j_per_tflop is None and fig.tflops_per_s_per_w is None
    assert fig.mean_power_w is None and fig.achieved_tflops_per_s is None
    assert fig.samples_per_j is None
    real = efficiency_figures(
        count_step_flops(mlp([8, 4]), torch.randn(2, 8)),
        steps=10,
        energy_j=5.0,
        duration_s=2.0,
        tokens=100,
        energy_provenance="counter (simulated)",
    )
    data = json.loads(json.dumps(real.to_dict()))
    assert data["energy_provenance"] == "counter (simulated)"
    assert "FlopCounterMode" in data["method"]
    assert data["tokens_per_j"] == pytest.approx(20.0)
    assert data["samples"] == 20


def test_efficiency_module_imports_no_lightning() -> None:
    import ast
    from pathlib import Path

    import lightning_sustain.energy.efficiency as module

    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" in imported
    assert not any(
        name and name.split(".")[0] in ("lightning", "pytorch_lightning") for name in imported
    )
