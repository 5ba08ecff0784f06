"""End-to-end demo: keygen, encrypt, fit (LightningCLI), report.

    python examples/tabular/demo.py --output-dir demo_output

1. ``lightning-sustain keygen`` writes a random 256-bit master key (mode 0600).
2. The breast-cancer data (bundled with scikit-learn) is encrypted into AES-256-GCM shards
   straight from memory.
3. ``lightning-sustain fit --config examples/tabular/config.yaml`` trains from the encrypted
   shards with EnergyMonitor, EnergyBudget and ShapSummary attached. Without an NVIDIA GPU
   the run uses lightning_sustain's simulated GPU, and every figure says "simulated".
4. ``lightning-sustain report`` writes report.md / report.html / emissions.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--no-simulated-gpu", action="store_true")
    args = parser.parse_args()
    out = (REPO / args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    key_file, shards, runs = out / "master.key", out / "shards", out / "runs"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    cli = [sys.executable, "-m", "lightning_sustain"]
    started = time.perf_counter()

    if not key_file.exists():
        run([*cli, "keygen", "--out", str(key_file)], env)
    if not (shards / "train" / "manifest.lsm").exists():
        print("$ encrypting the breast-cancer data from memory", flush=True)
        sys.path.insert(0, str(REPO))
        from examples.tabular.prepare_data import encrypt_breast_cancer

        print(encrypt_breast_cancer(str(shards), str(key_file)))

    extra: list[str] = []
    sim = None
    if not args.no_simulated_gpu:
        from lightning_sustain.energy.nvml import nvml_available

        if not nvml_available():
            from lightning_sustain.testing import SimulatedNVML

            sim = SimulatedNVML(1).install()  # children inherit the simulated GPU
            env.update(
                {
                    k: os.environ[k]
                    for k in ("LD_LIBRARY_PATH", "LIGHTNING_SUSTAIN_SIMNVML_STATE")
                    if k in os.environ
                }
            )
            extra.append("--trainer.callbacks+=lightning_sustain.testing.workload.SimulatedGpuLoad")
            print("No NVIDIA GPU here: training with the SIMULATED GPU (figures are labelled).")
    run(
        [
            *cli, "fit", "--config", str(HERE / "config.yaml"),
            f"--data.init_args.root={shards}", f"--data.init_args.key_file={key_file}",
            f"--trainer.default_root_dir={runs}", f"--trainer.logger.init_args.save_dir={runs}",
            f"--trainer.max_epochs={args.epochs}", "--trainer.enable_progress_bar=false",
            *extra,
        ],
        env,
    )  # fmt: skip
    run_dir = max((runs / "tabular").glob("version_*"), key=lambda p: p.stat().st_mtime)
    run(
        [*cli, "report", str(run_dir), "--functional-unit", "sample",
         "--target-metric", "val_acc", "--target-value", "0.95", "--energy-budget-kwh", "0.01"],
        env,
    )  # fmt: skip
    if sim is not None:
        sim.uninstall()

    summary = json.loads((run_dir / "energy_summary.json").read_text())
    totals = summary["totals"]
    print()
    print(f"Demo finished in {time.perf_counter() - started:.0f} s")
    print(f"  trained {totals['steps']} steps on encrypted shards ({shards})")
    print(
        f"  energy {totals['energy_kwh'] * 1000:.4f} Wh [{summary['provenance']}], "
        f"{totals['co2e_g']:.4f} g CO2e, {totals['energy_per_sample_j']:.3f} J per sample"
    )
    print(f"  report:        {run_dir / 'report.md'}  (and report.html, emissions.csv)")
    print(f"  energy trace:  {run_dir / 'energy_trace.csv'}")
    print(f"  SHAP summary:  {run_dir / 'shap' / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
