"""benchmarks/compress_charlm.py runs end to end on the tiny charlm in a few seconds."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS_IN_ORDER = ("nanomoe-scalar", "nanomoe-diagonal", "svd")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """One tiny run at budget 1/2 with 2 seeds: stdout and the JSON it wrote."""
    out = tmp_path_factory.mktemp("compress") / "compress.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "compress_charlm.py"), "--size", "tiny"]
    command += ["--budgets", "0.5", "--train-steps", "5", "--finetune-steps", "3", "--iters", "2"]
    command += ["--seeds", "2"]
    command += ["--out", str(out), "--no-plot"]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=out.parent)
    assert finished.returncode == 0, finished.stderr
    return finished.stdout, json.loads(out.read_text())


def finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def test_structure(result) -> None:
    stdout, report = result
    assert report["settings"]["budgets"] == [0.5]
    assert [record["seed"] for record in report["dense"]] == [0, 1]
    dense = report["dense"][0]
    # Each seed trains its own dense model.
    assert report["dense"][1]["test"]["loss"] != dense["test"]["loss"]
    for record in report["dense"]:
        assert finite(record["test"]["loss"]) and finite(record["val"]["loss"])
    rows = report["rows"]
    assert [(row["seed"], row["method"]) for row in rows] == [
        (seed, method) for seed in (0, 1) for method in METHODS_IN_ORDER
    ]
    for row in rows:
        assert row["budget"] == 0.5
        assert row["layers"] == 6  # the tiny model's hidden layers: q, k, v, out and the MLP's two
        for when in ("before", "after"):
            for split in ("val", "test"):
                assert finite(row[when][split]["loss"]), (row["method"], when, split)
        assert 0 < row["weight_error"] < 1
        assert 0 < row["hidden_params"] <= 0.5 * dense["hidden_params"]
    assert "| 1/2 | svd |" in stdout and "| 1 | dense |" in stdout
    # Two seeds: each cell is a mean and a standard deviation over them.
    svd_losses = [row["before"]["test"]["loss"] for row in rows if row["method"] == "svd"]
    mean = sum(svd_losses) / 2
    std = abs(svd_losses[0] - svd_losses[1]) / 2**0.5
    svd_line = next(line for line in stdout.splitlines() if line.startswith("| 1/2 | svd |"))
    assert f"| {mean:.3f} ± {std:.3f} |" in svd_line
    # NanoMoE's cells also give its loss minus SVD's on the same dense model, over the seeds.
    scalar = [row["before"]["test"]["loss"] for row in rows if row["method"] == "nanomoe-scalar"]
    differences = [a - b for a, b in zip(scalar, svd_losses)]
    spread = abs(differences[0] - differences[1]) / 2**0.5
    line = next(line for line in stdout.splitlines() if line.startswith("| 1/2 | nanomoe-scalar"))
    assert f"({sum(differences) / 2:+.3f} ± {spread:.3f})" in line


def test_svd_matches_replace_linear(result) -> None:
    """The script's truncated SVD has the error replace_linear reports for SVD at its budget."""
    _, report = result
    rows = {row["method"]: row for row in report["rows"] if row["seed"] == 0}
    svd = rows["svd"]["weight_error"]
    for method in ("nanomoe-scalar", "nanomoe-diagonal"):
        assert rows[method]["svd_error"] == pytest.approx(svd, rel=1e-6)
