"""``inco run`` as a user types it, in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _inco(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO,
        env={**os.environ, "INCO_HOME": str(home), "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_run_smoke_json(neu_path: Path, tmp_path: Path) -> None:
    proc = _inco(
        [
            "run",
            "--method",
            "inco",
            "--ratio",
            "1:32",
            "--eval",
            "finetune",
            "--preset",
            "smoke",
            "--data",
            str(neu_path),
            "--json",
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    (row,) = out["results"]
    assert row["method"] == "inco" and row["ratio"] == "1:32" and row["eval"] == "finetune"
    assert 0.0 <= row["accuracy"] <= 1.0
    run_dir = Path(out["run_dir"])
    assert run_dir.parent == tmp_path / "runs"
    assert (run_dir / "result.json").exists() and list((run_dir / "checkpoints").glob("*.pt"))


@pytest.mark.slow
def test_run_prints_a_results_table(neu_path: Path, tmp_path: Path) -> None:
    proc = _inco(
        [
            "run",
            "--method",
            "supervised",
            "--ratio",
            "1:32",
            "--preset",
            "smoke",
            "--data",
            str(neu_path),
            "--out",
            str(tmp_path / "mine"),
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Supervised" in proc.stdout and "1:32" in proc.stdout and "%" in proc.stdout
    assert (tmp_path / "mine" / "result.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratio", "16"], "ratio must look like 1:16 (got '16')"),
        (["--ratio", "1:0"], "between 1 and 256"),
        (["--method", "byol"], "method"),
        (["--eval", "sometimes"], "--eval must be finetune, linear or both"),
        (["--set", "pretrain.epocs=3"], "overrides.pretrain.epocs: unknown field"),
        (["--set", "novalue"], "--set takes key=value"),
        (["--data", "/no/such/folder"], "data path /no/such/folder does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], message: str, neu_path: Path, tmp_path: Path) -> None:
    full = ["run", "--preset", "smoke", "--device", "cpu"]
    if "--data" not in args:
        full += ["--data", str(neu_path)]
    proc = _inco(full + args, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("Error:"), proc.stderr
    assert message in proc.stderr.replace("\n", " ")
    assert "Traceback" not in proc.stderr


def test_missing_data_says_how_to_fix(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "INCO_DATA"}
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", "--preset", "smoke"],
        cwd=REPO,
        env={**env, "INCO_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "pass --data PATH" in proc.stderr and "INCO_DATA" in proc.stderr


def test_ratio_too_large_for_the_data(tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (40, 40), color=i * 40).save(tmp_path / "data" / cls / f"{i}.png")
    proc = _inco(["run", "--preset", "smoke", "--data", str(tmp_path / "data"), "--ratio", "1:8"], tmp_path)
    assert proc.returncode == 1
    assert "ratio 1:8 leaves no labelled image in class a (3 training images): use 1:5 or less" in proc.stderr
