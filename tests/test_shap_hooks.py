"""Explaining never touches the user's model: hooks, buffers, flags, RNG (no Trainer)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from lightning_sustain.explain import (
    capture_rng_state,
    detached_copy,
    explain_model,
    snapshot_module,
)


class Buffered(nn.Module):
    """A registered buffer used in forward, a dropout in train mode, a frozen layer."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 8)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 2)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d))
        self.register_buffer("seen", torch.zeros(()))  # a user counter in a buffer
        self.fc2.weight.requires_grad_(False)

    def forward(self, x):
        if self.training:
            self.seen += 1
        return self.fc2(self.drop(self.act(self.fc1(x * self.scale))))


def _hook_everything(model: nn.Module, counts: Counter) -> list:
    """Every kind of hook torch offers, on every module and parameter, counting calls."""

    def count(name):
        def hook(*args, **kwargs):
            counts[name] += 1

        return hook

    handles = []
    for mod_name, mod in model.named_modules():
        tag = mod_name or "root"
        handles += [
            mod.register_forward_hook(count(f"fwd:{tag}")),
            mod.register_forward_hook(count(f"fwd_kw:{tag}"), with_kwargs=True),
            mod.register_forward_hook(count(f"fwd_always:{tag}"), always_call=True),
            mod.register_forward_pre_hook(count(f"pre:{tag}")),
            mod.register_forward_pre_hook(count(f"pre_kw:{tag}"), with_kwargs=True),
            mod.register_full_backward_hook(count(f"bwd:{tag}")),
            mod.register_full_backward_pre_hook(count(f"bwd_pre:{tag}")),
            mod.register_state_dict_pre_hook(count(f"sd_pre:{tag}")),
            mod.register_state_dict_post_hook(count(f"sd_post:{tag}")),
            mod.register_load_state_dict_pre_hook(count(f"load_pre:{tag}")),
            mod.register_load_state_dict_post_hook(count(f"load_post:{tag}")),
        ]
    for p_name, param in model.named_parameters():
        if param.requires_grad:
            handles.append(param.register_hook(count(f"tensor:{p_name}")))
            handles.append(param.register_post_accumulate_grad_hook(count(f"acc:{p_name}")))
    handles.append(torch_module.register_module_forward_hook(count("global_fwd")))
    handles.append(torch_module.register_module_forward_pre_hook(count("global_pre")))
    handles.append(torch_module.register_module_full_backward_hook(count("global_bwd")))
    return handles


@pytest.mark.parametrize("explainer", ["auto", "deep", "gradient", "permutation"])
def test_no_user_hook_fires_and_model_state_is_unchanged(explainer):
    torch.manual_seed(0)
    model = Buffered()
    model.train()
    model.act.eval()  # a mixed-mode model
    counts: Counter = Counter()
    handles = _hook_everything(model, counts)
    try:
        before = snapshot_module(model)  # calls state_dict (and its hooks) itself
        counts.clear()
        bg, x = torch.randn(8, 6), torch.randn(5, 6)
        random.seed(3)
        np.random.seed(3)
        torch.manual_seed(3)
        rng_before = capture_rng_state()
        grad_mode = torch.is_grad_enabled()
        res = explain_model(model, bg, x, explainer=explainer, npermutations=2, nsamples=4)
        assert np.isfinite(res.values).all()
        assert counts == Counter(), f"user hooks fired during the explanation: {dict(counts)}"
        assert snapshot_module(model).differences(before) == []
        rng_after = capture_rng_state()
        assert rng_before.python == rng_after.python
        assert torch.equal(rng_before.torch_cpu, rng_after.torch_cpu)
        assert all(
            np.array_equal(a, b) for a, b in zip(rng_before.numpy, rng_after.numpy, strict=True)
        )
        assert torch.is_grad_enabled() == grad_mode
        assert model.seen.item() == 0 and model.training and not model.act.training
        # the hooks are still there and still work on the trained model
        model(torch.randn(3, 6)).sum().backward()
        model.state_dict()
        kinds = ("fwd:fc1", "pre:fc1", "bwd:fc1", "bwd_pre:fc1", "sd_post:root",
                 "tensor:fc1.weight", "acc:fc1.weight", "global_fwd", "global_bwd")  # fmt: skip
        for kind in kinds:
            assert counts[kind] >= 1, kind
    finally:
        for handle in handles:
            handle.remove()


def test_same_hook_counts_as_without_the_explanation():
    """Hook call counts of a fixed workload are identical with and without explaining."""

    def workload(explain: bool) -> Counter:
        torch.manual_seed(0)
        model = Buffered()
        counts: Counter = Counter()
        handles = _hook_everything(model, counts)
        try:
            model(torch.randn(4, 6)).sum().backward()
            if explain:
                explain_model(model, torch.randn(6, 6), torch.randn(3, 6), explainer="gradient",
                              nsamples=2)  # fmt: skip
            model(torch.randn(4, 6)).sum().backward()
        finally:
            for handle in handles:
                handle.remove()
        return counts

    without, with_shap = workload(False), workload(True)
    assert sum(without.values()) > 0
    assert with_shap == without


def test_copy_keeps_framework_hooks_and_drops_user_hooks():
    import functools

    from lightning.pytorch.utilities.model_summary.model_summary import LayerSummary

    from lightning_sustain.explain.model import is_framework_hook

    layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))  # parametrization, no hook
    user = layer.register_forward_hook(lambda *a: None, always_call=True)
    framework = functools.partial(torch.nn.functional.relu)  # stands for a torch-defined hook
    kept = layer.register_forward_hook(lambda m, a, out, f=framework: None)
    kept.remove()
    summary = LayerSummary(nn.Linear(2, 2))  # Lightning's own forward hook
    assert is_framework_hook(framework) and not is_framework_hook(lambda: None)
    assert all(is_framework_hook(h) for h in summary._module._forward_hooks.values())
    copy = detached_copy(layer)
    assert len(copy._forward_hooks) == 0 and len(copy._forward_hooks_always_called) == 0
    assert len(layer._forward_hooks) == 1 and len(layer._forward_hooks_always_called) == 1
    x = torch.randn(2, 4)
    torch.testing.assert_close(copy(x), layer(x))
    lightning_copy = detached_copy(summary._module)
    assert len(lightning_copy._forward_hooks) == len(summary._module._forward_hooks) == 1
    user.remove()
    summary.detach_hook()


def test_global_hooks_restored_after_a_failure():
    calls = Counter()
    handle = torch_module.register_module_forward_hook(lambda *a: calls.update(["g"]))
    try:

        class Broken(nn.Module):
            def forward(self, x):
                return (x, x)

        with pytest.raises(TypeError):
            explain_model(Broken(), torch.randn(3, 2), torch.randn(2, 2))
        assert calls["g"] == 0
        nn.Linear(2, 2)(torch.randn(1, 2))
        assert calls["g"] == 1  # the global hook is back
    finally:
        handle.remove()
