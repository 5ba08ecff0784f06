"""ShapSummary cost vs. training: time and peak memory, measured side by side.

Target (issue 6): explaining 200 samples of a 30-feature tabular model against 100
background samples takes < 5% of a 20-epoch training run of that model, and its peak
memory stays within 2x the training run's.

Setup: ``sklearn.datasets.load_breast_cancer`` (569 rows, 30 features, standardised),
369 rows for training and 200 for validation (ShapSummary explains validation rows); an MLP
30-64-64-2 with ReLU trained with Adam, batch size 32, for 20 epochs by a Lightning
``Trainer`` on the CPU (validation every epoch, CSVLogger, default checkpointing, progress
bar off), with ``ShapSummary(num_background=100, num_samples=200)`` in its callbacks.

Kinds, each in its own fresh subprocess, interleaved and repeated (medians printed):

* ``fit+shap-auto``: the run above; ShapSummary with its defaults (``explainer="auto"``
  picks DeepExplainer for this model).
* ``fit+shap-gradient``: the same with ``ShapSummary(explainer="gradient")``.
* ``cold-explain-auto``: ``explain_model`` alone in a process that has not trained (no warm
  allocator or autograd engine): the worst case for memory.

Time: training = ``trainer.fit`` wall time minus the ShapSummary hook's time; explanation =
``explain_s`` from ``summary.json`` (selection + SHAP values); the hook's total (drawing
rows + explanation + plots/npz/summaries) is printed too. Ratios are computed per run, then
the median is taken.

Memory: peak RSS above a baseline taken just before ``trainer.fit`` (model, data and all
libraries loaded). A thread samples RSS (psutil) every 1 ms; in addition, the kernel's
exact ``ru_maxrss`` is read at the phase boundaries and, when it grew during a phase, is
that phase's peak. Training phase: from ``fit`` start to the start of ShapSummary's hook;
explanation phase: the hook. Ratio = explanation peak delta / training peak delta. For
``cold-explain-auto`` the baseline is the RSS just before ``explain_model``. (tracemalloc
would not see torch's C++ allocations, so it is not used.)

Run: ``.venv/bin/python benchmarks/bench_shap.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

N_BACKGROUND = 100
N_EXPLAIN = 200
EPOCHS = 20


def _data():
    import numpy as np
    import torch
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = torch.tensor(x[order]), torch.tensor(y[order]).long()
    return x[:369], y[:369], x[369:], y[369:]


def _model():
    import lightning.pytorch as pl
    import torch
    from torch import nn

    class Mlp(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
            )

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return Mlp()


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssSampler:
    """Samples RSS every 1 ms; ``peak_since(mark)`` gives the peak after a mark."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def start(self) -> _RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.rss()))
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, t0: float, t1: float, maxrss0: int, maxrss1: int) -> int:
        sampled = max((r for t, r in self.samples if t0 <= t <= t1), default=0)
        return max(sampled, maxrss1) if maxrss1 > maxrss0 else sampled


def _child(kind: str, workdir: Path, batch_size: int | None) -> dict:
    import lightning.pytorch as pl
    import shap  # noqa: F401  (imported outside the measured sections in every kind)
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sustain.callbacks.shap_summary import ShapSummary
    from lightning_sustain.explain import explain_model, load_summary

    torch.manual_seed(0)
    xtr, ytr, xva, yva = _data()
    model = _model()
    sampler = _RssSampler()

    if kind == "cold-explain-auto":
        background, explained = xtr[:N_BACKGROUND], xva[:N_EXPLAIN]
        base = sampler.rss()
        sampler.start()
        t0, m0 = time.perf_counter(), _maxrss()
        result = explain_model(
            model, background, explained, **({"batch_size": batch_size} if batch_size else {})
        )
        t1, m1 = time.perf_counter(), _maxrss()
        sampler.stop()
        return {
            "kind": kind,
            "explain_s": t1 - t0,
            "explain_peak_mb": (sampler.peak(t0, t1, m0, m1) - base) / 2**20,
            "explainer": result.explainer,
        }

    marks: dict[str, float] = {}

    import lightning_sustain.callbacks.shap_summary as shap_summary_module

    real_explain = shap_summary_module.explain_model

    def timed_explain(*args, **kwargs):
        marks["explain_start"], marks["maxrss_explain_start"] = time.perf_counter(), _maxrss()
        try:
            return real_explain(*args, **kwargs)
        finally:
            marks["explain_end"], marks["maxrss_explain_end"] = time.perf_counter(), _maxrss()

    shap_summary_module.explain_model = timed_explain

    class TimedShap(ShapSummary):
        def on_train_end(self, trainer, pl_module):
            marks["shap_start"], marks["maxrss_shap_start"] = time.perf_counter(), _maxrss()
            super().on_train_end(trainer, pl_module)
            marks["shap_end"], marks["maxrss_shap_end"] = time.perf_counter(), _maxrss()

    explainer = "gradient" if kind == "fit+shap-gradient" else "auto"
    cb = TimedShap(
        num_background=N_BACKGROUND,
        num_samples=N_EXPLAIN,
        explainer=explainer,
        **({"batch_size": batch_size} if batch_size else {}),
    )
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(workdir / kind),
        default_root_dir=workdir / kind,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xva, yva), batch_size=32)
    base = sampler.rss()
    sampler.start()
    t0, m0 = time.perf_counter(), _maxrss()
    trainer.fit(model, train, val)
    t1 = time.perf_counter()
    sampler.stop()
    shap_s = marks["shap_end"] - marks["shap_start"]
    train_peak = sampler.peak(t0, marks["shap_start"], m0, marks["maxrss_shap_start"])
    shap_peak = sampler.peak(
        marks["shap_start"], marks["shap_end"], marks["maxrss_shap_start"], marks["maxrss_shap_end"]
    )
    explain_peak = sampler.peak(
        marks["explain_start"],
        marks["explain_end"],
        marks["maxrss_explain_start"],
        marks["maxrss_explain_end"],
    )
    summary = load_summary(cb.last_dir)
    return {
        "kind": kind,
        "train_s": (t1 - t0) - shap_s,
        "explain_s": summary["explain_s"],
        "hook_s": shap_s,
        "train_peak_mb": (train_peak - base) / 2**20,
        "explain_peak_mb": (explain_peak - base) / 2**20,
        "hook_peak_mb": (shap_peak - base) / 2**20,
        "explainer": summary["explainer"],
        "n_explained": summary["n_explained"],
        "n_background": summary["n_background"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="ShapSummary(batch_size=...) (default: its own)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, Path(args.workdir), args.batch_size)))
        return

    kinds = ["fit+shap-auto", "fit+shap-gradient", "cold-explain-auto"]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for rep in range(args.repeats):
        for kind in kinds:
            with tempfile.TemporaryDirectory() as tmp:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", kind, "--workdir", tmp]
                    + (["--batch-size", str(args.batch_size)] if args.batch_size else []),
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=600,
                )
            if proc.returncode != 0:
                sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results[kind].append(row)
            print(f"rep {rep} " + json.dumps(row), flush=True)

    def med(values) -> float:
        return statistics.median(values)

    print()
    print(f"medians over {args.repeats} interleaved repeats")
    for kind in kinds[:2]:
        rows = results[kind]
        print(
            f"{kind} (explainer: {rows[0]['explainer']}, {rows[0]['n_explained']} explained, "
            f"{rows[0]['n_background']} background)"
        )
        print(
            f"  train_s {med(r['train_s'] for r in rows):.3f}   explain_s "
            f"{med(r['explain_s'] for r in rows):.3f}   hook_s (incl. plots) "
            f"{med(r['hook_s'] for r in rows):.3f}"
        )
        print(
            f"  train peak +{med(r['train_peak_mb'] for r in rows):.1f} MB   explain peak "
            f"+{med(r['explain_peak_mb'] for r in rows):.1f} MB   hook peak (incl. plots) "
            f"+{med(r['hook_peak_mb'] for r in rows):.1f} MB"
        )
        print(
            f"  explain / train time  = "
            f"{100 * med(r['explain_s'] / r['train_s'] for r in rows):6.2f} %  (target < 5 %)"
        )
        print(
            f"  hook / train time     = "
            f"{100 * med(r['hook_s'] / r['train_s'] for r in rows):6.2f} %  (plots included)"
        )
        print(
            f"  explain / train peak  = "
            f"{med(r['explain_peak_mb'] / r['train_peak_mb'] for r in rows):6.2f} x  "
            "(target <= 2 x)"
        )
        print(
            f"  hook / train peak     = "
            f"{med(r['hook_peak_mb'] / r['train_peak_mb'] for r in rows):6.2f} x  (plots included)"
        )
    cold = results["cold-explain-auto"]
    train_peak = med(r["train_peak_mb"] for r in results["fit+shap-auto"])
    print(
        f"cold-explain-auto ({cold[0]['explainer']}): explain_s "
        f"{med(r['explain_s'] for r in cold):.3f}, peak +"
        f"{med(r['explain_peak_mb'] for r in cold):.1f} MB = "
        f"{med(r['explain_peak_mb'] for r in cold) / train_peak:.2f} x the training peak "
        "(fresh process, no warm allocator)"
    )


if __name__ == "__main__":
    main()
