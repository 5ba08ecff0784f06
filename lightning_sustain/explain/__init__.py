"""SHAP explanations for PyTorch models: plain Python and torch, no Trainer inside.

``explain_model`` picks an explainer (:func:`select_explainer`), computes SHAP values on a
hook-free copy of the model with the global random state preserved, and returns a
:class:`ShapResult`; ``write_artefacts`` turns it into plots, ``shap_values.npz``,
``summary.json`` and ``summary.md``; ``load_summary`` reads the JSON back.
"""

from lightning_sustain.explain.artefacts import (
    SUMMARY_SCHEMA,
    ArtefactIndex,
    load_summary,
    write_artefacts,
)
from lightning_sustain.explain.core import Inputs, ShapResult, explain_model, input_kind
from lightning_sustain.explain.model import (
    ModuleSnapshot,
    OutputAdapter,
    detached_copy,
    snapshot_module,
    suspended_global_hooks,
)
from lightning_sustain.explain.rng import RngState, capture_rng_state, preserved_rng_state
from lightning_sustain.explain.sampling import (
    draw_samples,
    extract_input,
    extract_inputs,
    first_loader,
)
from lightning_sustain.explain.selection import (
    DeepSupport,
    ExplainerChoice,
    ExplainerName,
    check_deep_support,
    check_gradients,
    find_embedding_layer,
    select_explainer,
)

__all__ = [
    "SUMMARY_SCHEMA",
    "ArtefactIndex",
    "DeepSupport",
    "ExplainerChoice",
    "ExplainerName",
    "Inputs",
    "ModuleSnapshot",
    "OutputAdapter",
    "RngState",
    "ShapResult",
    "capture_rng_state",
    "check_deep_support",
    "check_gradients",
    "detached_copy",
    "draw_samples",
    "explain_model",
    "extract_input",
    "extract_inputs",
    "find_embedding_layer",
    "first_loader",
    "input_kind",
    "load_summary",
    "preserved_rng_state",
    "select_explainer",
    "snapshot_module",
    "suspended_global_hooks",
    "write_artefacts",
]
