"""The command line and the examples, run the way users run them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_sustain.cli import main

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", "lightning_sustain", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=dict(env or os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip


def test_usage_and_unknown_tool(capsys) -> None:
    assert main([]) == 2
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "keygen" in out and "report" in out and "fit" in out


@pytest.mark.parametrize("command", ["fit", "keygen", "encrypt", "verify", "rotate-key", "report"])
def test_every_subcommand_has_help(command: str, tmp_path: Path) -> None:
    out = cli(command, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


def test_fit_help_documents_our_plugins(tmp_path: Path) -> None:
    out = cli("fit", "--help", cwd=tmp_path)
    assert out.returncode == 0
    help_for_monitor = cli("fit", "--trainer.callbacks.help", "EnergyMonitor", cwd=tmp_path)
    assert help_for_monitor.returncode == 0, help_for_monitor.stderr
    assert "carbon_intensity_g_per_kwh" in help_for_monitor.stdout
    assert "gCO2e/kWh" in help_for_monitor.stdout  # the docstring reaches --help


def _prepare(tmp_path: Path) -> tuple[Path, Path]:
    key = tmp_path / "master.key"
    assert cli("keygen", "--out", str(key), cwd=tmp_path).returncode == 0
    sys.path.insert(0, str(REPO))
    from examples.tabular.prepare_data import encrypt_breast_cancer

    encrypt_breast_cancer(str(tmp_path / "shards"), str(key))
    return key, tmp_path / "shards"


def test_print_config_has_our_parts_and_no_secret(tmp_path: Path) -> None:
    key, shards = _prepare(tmp_path)
    out = cli(
        "fit", "--config", str(REPO / "examples/tabular/config.yaml"),
        f"--data.init_args.root={shards}", f"--data.init_args.key_file={key}",
        "--trainer.strategy=sustain_ddp", "--print_config", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    config = out.stdout
    # jsonargparse writes the shortest import path of our classes
    assert "class_path: lightning_sustain.EnergyMonitor" in config
    assert "class_path: lightning_sustain.EncryptedShardDataModule" in config
    assert "key_file:" in config
    assert "sustain_ddp" in config
    raw = key.read_bytes().strip()
    for form in _key_forms(raw):
        assert form not in config


def _key_forms(raw: bytes) -> list[str]:
    from lightning_sustain.data.keys import parse_raw_key

    key = parse_raw_key(raw, "key file", legacy=True)
    assert len(key) == 32
    return [
        key.hex(), key.hex().upper(), base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode().rstrip("="), raw.decode(errors="ignore"),
    ]  # fmt: skip


def test_tabular_example_fit_and_report_from_encrypted_shards(tmp_path: Path) -> None:
    key, shards = _prepare(tmp_path)
    runs = tmp_path / "runs"
    out = cli(
        "fit", "--config", str(REPO / "examples/tabular/config.yaml"),
        f"--data.init_args.root={shards}", f"--data.init_args.key_file={key}",
        f"--trainer.default_root_dir={runs}", f"--trainer.logger.init_args.save_dir={runs}",
        "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks.init_args.num_samples=20", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = next((runs / "tabular").glob("version_*"))
    summary = json.loads((run_dir / "energy_summary.json").read_text())
    assert summary["totals"]["steps"] == 30
    assert (run_dir / "report.md").exists() and (run_dir / "emissions.csv").exists()
    assert (run_dir / "shap" / "summary.json").exists()
    report = cli("report", str(run_dir), "--functional-unit", "sample", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "per training sample" in (run_dir / "report.md").read_text()
    # the key never reaches anything the run wrote
    forms = _key_forms(key.read_bytes().strip())
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(f.encode() in data for f in forms if f), path


def test_drop_in_example(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from examples.drop_in import main as drop_in

    trainer = drop_in(max_epochs=2, root=str(tmp_path))
    log_dir = Path(trainer.log_dir)
    assert (log_dir / "energy_summary.json").exists()
    assert (log_dir / "shap" / "summary.json").exists()
    assert (log_dir / "report.html").exists()


def test_report_tool_on_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    out = cli("report", str(tmp_path / "nope"), cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


def test_ddp_yaml_example_two_processes(tmp_path: Path) -> None:
    out = cli(
        "fit", "--config", str(REPO / "examples/ddp.yaml"), "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={tmp_path / 'ddp'}", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = next((tmp_path / "ddp" / "lightning_logs").glob("version_*"))
    energy = json.loads((run_dir / "energy_summary.json").read_text())
    assert energy["world_size"] == 2
    assert [r["global_rank"] for r in energy["ranks"]] == [0, 1]
    per_rank = sum(r["energy_j"] for r in energy["ranks"])
    assert energy["totals"]["energy_j"] == pytest.approx(per_rank, rel=1e-9)
    ddp = json.loads((run_dir / "ddp_summary.json").read_text())
    assert len(ddp["ranks"]) == 2
