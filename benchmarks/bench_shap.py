"""ShapSummary cost vs. training on the tabular example, measured side by side.

Target (issue 12): at default settings, ShapSummary's whole hook (drawing rows, importing
what it needs, explaining, plots, npz and summaries) takes < 5 % of a 20-epoch training run
of the tabular example; the fixed cost per fit is stated. (Issue 6's memory target, the
hook's peak RSS within 2x the training run's, is printed too.)

Setup: the tabular example's model (``examples/tabular/model.py``,
``BreastCancerClassifier``: 30-32-32-1 ReLU MLP, Adam) on scikit-learn's bundled
breast-cancer data, standardised, split 80/20 as ``examples/tabular_demo.py`` does (455
training rows, 114 validation rows; plain tensors instead of the example's encrypted shards,
whose decryption is not what is measured here), batch size 32, 20 epochs, a Lightning
``Trainer`` on the CPU with validation every epoch, CSVLogger and default checkpointing,
progress bar off.

Kinds, each in its own fresh Python process (so every import is paid where it is paid in
real use), interleaved and repeated; medians and ranges printed:

* ``fit``: no ShapSummary.
* ``fit+shap``: ``ShapSummary()`` with all defaults (100 background rows, up to 200
  explained rows: the 114 validation rows).
* ``fit+shap-tiny``: ``ShapSummary(num_background=1, num_samples=1)``: its hook time is the
  fixed cost per fit (imports, probing the model, drawing, figures, files).

Time: training = ``trainer.fit`` wall time minus the hook's window (``total_s`` in
summary.json, measured by the callback from entering to leaving its hook). Ratio = hook /
training, per run, then the median. The paired cross-check compares whole ``fit`` wall
times of ``fit+shap`` with the interleaved ``fit`` runs.

Memory: peak RSS above a baseline taken just before ``trainer.fit``, sampled every 1 ms
(psutil) plus the kernel's ``ru_maxrss`` at the phase boundaries.

Run: ``python benchmarks/bench_shap.py [--repeats 5]``
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

EPOCHS = 20
REPO = Path(__file__).resolve().parents[1]


def _data():
    import torch
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    train_idx, val_idx = order[:cut], order[cut:]
    mean, std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-6
    x = (x - mean) / std
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx], list(data.feature_names)


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssSampler:
    """Samples RSS every 1 ms."""

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
            self.samples.append((time.monotonic(), self.rss()))
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, t0: float, t1: float) -> int:
        return max((r for t, r in self.samples if t0 <= t <= t1), default=0)


def _child(kind: str, workdir: Path) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from examples.tabular.model import BreastCancerClassifier
    from lightning_sustain.callbacks.shap_summary import ShapSummary

    pl.seed_everything(0, verbose=False)
    xtr, ytr, xva, yva, names = _data()
    callbacks = []
    shap = None
    if kind == "fit+shap":
        shap = ShapSummary(feature_names=names)
    elif kind == "fit+shap-tiny":
        shap = ShapSummary(num_background=1, num_samples=1, feature_names=names)
    if shap is not None:
        callbacks.append(shap)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(workdir / kind),
        default_root_dir=workdir / kind,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xva, yva), batch_size=256)
    model = BreastCancerClassifier()
    sampler = _RssSampler()
    base = sampler.rss()
    sampler.start()
    t0, m0 = time.monotonic(), _maxrss()
    trainer.fit(model, train, val)
    t1, m1 = time.monotonic(), _maxrss()
    sampler.stop()
    row = {"kind": kind, "fit_s": t1 - t0, "new_shap_import": "shap" in sys.modules}
    if shap is None:
        row.update(train_s=t1 - t0, train_peak_mb=(sampler.peak(t0, t1) - base) / 2**20)
        return row
    summary = json.loads((Path(shap.last_dir) / "summary.json").read_text())
    window = summary["context"]["window"]
    hook_s = summary["total_s"]
    train_peak = sampler.peak(t0, window["start_monotonic_s"])
    hook_peak = sampler.peak(window["start_monotonic_s"], window["end_monotonic_s"])
    if m1 > m0:
        hook_peak = max(hook_peak, m1)
    row.update(
        train_s=(t1 - t0) - hook_s,
        hook_s=hook_s,
        explain_s=summary["explain_s"],
        plot_s=summary["plot_s"],
        explainer=summary["explainer"],
        n_explained=summary["n_explained"],
        n_background=summary["n_background"],
        additivity_rel=max(summary["additivity"]["relative_to_output_std"]),
        train_peak_mb=(train_peak - base) / 2**20,
        hook_peak_mb=(hook_peak - base) / 2**20,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, Path(args.workdir))))
        return

    kinds = ["fit", "fit+shap", "fit+shap-tiny"]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    print(f"load average before: {os.getloadavg()}", flush=True)
    for rep in range(args.repeats):
        for kind in kinds:
            with tempfile.TemporaryDirectory() as tmp:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", kind, "--workdir", tmp],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=900,
                )
            if proc.returncode != 0:
                sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["load1"] = os.getloadavg()[0]
            results[kind].append(row)
            print(f"rep {rep} " + json.dumps(row), flush=True)

    def stats(values) -> str:
        values = list(values)
        return f"{statistics.median(values):.3f} [{min(values):.3f}..{max(values):.3f}]"

    print()
    print(f"medians [min..max] over {args.repeats} interleaved repeats; load average now "
          f"{os.getloadavg()}")  # fmt: skip
    plain = results["fit"]
    print(f"fit (no ShapSummary): fit_s {stats(r['fit_s'] for r in plain)}")
    for kind in kinds[1:]:
        rows = results[kind]
        print(
            f"{kind} (explainer {rows[0]['explainer']}, {rows[0]['n_explained']} explained, "
            f"{rows[0]['n_background']} background, shap imported: "
            f"{any(r['new_shap_import'] for r in rows)})"
        )
        print(f"  train_s {stats(r['train_s'] for r in rows)}")
        print(f"  hook_s  {stats(r['hook_s'] for r in rows)}  (explain_s "
              f"{stats(r['explain_s'] for r in rows)}, plot_s "
              f"{stats(r['plot_s'] for r in rows)})")  # fmt: skip
        print(
            f"  hook / train time = {stats(100 * r['hook_s'] / r['train_s'] for r in rows)} % "
            "(target < 5 %, plots included)"
        )
        paired = [
            100 * (r["fit_s"] - p["fit_s"]) / p["fit_s"] for r, p in zip(rows, plain, strict=True)
        ]
        print(f"  paired whole-fit overhead vs interleaved 'fit' = {stats(paired)} %")
        print(f"  additivity error (max, relative to std f) = "
              f"{stats(r['additivity_rel'] for r in rows)}")  # fmt: skip
        print(
            f"  peak RSS: train +{stats(r['train_peak_mb'] for r in rows)} MB, hook "
            f"+{stats(r['hook_peak_mb'] for r in rows)} MB, ratio "
            f"{stats(r['hook_peak_mb'] / max(r['train_peak_mb'], 1e-9) for r in rows)} x "
            "(target <= 2 x)"
        )
    tiny = results["fit+shap-tiny"]
    print(f"fixed cost per fit (hook with 1 background row, 1 explained row): "
          f"{stats(r['hook_s'] for r in tiny)} s")  # fmt: skip


if __name__ == "__main__":
    main()
