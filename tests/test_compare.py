"""`nanomoe compare` end to end on a tiny setting: the outputs, the tuning protocol, determinism."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from nanomoe.compare.cli import main
from nanomoe.compare.layers import LAYER_KINDS
from nanomoe.compare.runner import Settings, compare, compare_task, run_count, trials
from nanomoe.compare.tasks import make_task

KINDS = ["dense", "lowrank", "monarch", "nanomoe-scalar", "nanomoe-full"]


def test_cli_writes_table_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "--tasks",
        "teacher",
        "digits",
        "--kinds",
        *KINDS,
        "--budgets",
        "0.5",
        "0.25",
        "--block-counts",
        "1",
        "2",
        "--monarch-blocks",
        "1",
        "2",
    ]
    argv += ["--lrs", "1e-3", "1e-2", "--seeds", "0", "1", "--size", "tiny", "--steps", "4"]
    main([*argv, "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "compare.json").read_text())["summary"]
    # dense once per task, every other layer type at every budget
    expected = {
        (task, kind, budget)
        for task in ("teacher", "digits")
        for kind in KINDS
        for budget in ((1.0,) if kind == "dense" else (0.5, 0.25))
    }
    assert {(row["task"], row["kind"], row["budget"]) for row in summary} == expected
    assert all(row["seeds"] == 2 for row in summary)
    # tuned from the grid, or (no structure to tune) from as many rates spread over its range
    assert all(0.999e-3 <= row["learning_rate"] <= 1.001e-2 for row in summary)
    assert "nanomoe-full" in capsys.readouterr().out
    for name in ("compare.txt", "compare-teacher.png", "curves-digits.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_tuning_protocol_and_budgets(tmp_path: Path) -> None:
    """Each configuration runs every learning rate once, then the best with the other seeds; the
    compared layers of every run stay within their budget."""
    settings = Settings(
        ("dense", "lowrank", "nanomoe-diagonal"),
        (0.25,),
        "params",
        (1e-3, 3e-3, 1e-2),
        (0, 1, 2),
        block_counts=(2, 4),
        monarch_blocks=(2, 4),
        steps=3,
    )
    runs = compare([make_task("teacher", "tiny")], settings)
    assert len(runs) == 3 * 3  # (dense, lowrank, nanomoe) x 3 seeds reported
    assert run_count(settings, 1) == 3 * (2 * 3 + 3 - 1)
    tuned = {run.layers[0]["num_blocks"] for run in runs if run.kind == "nanomoe-diagonal"}
    assert len(tuned) == 1 and tuned <= {2, 4}  # every seed trains the tuned block count
    dense_params = next(run.params for run in runs if run.kind == "dense")
    for run in runs:
        assert run.kind == "dense" or run.params <= 0.25 * dense_params
        assert run.step_ms > 0 and run.memory_mib > 0 and run.curve


def test_every_layer_type_gets_the_same_trials() -> None:
    settings = Settings(
        LAYER_KINDS, (0.25,), "params", (1e-3, 1e-2), (0,), (4, 16, 64), (2, 4, 8), (2, 4, 8)
    )
    counts = {kind: len(trials(kind, settings)) for kind in LAYER_KINDS}
    assert set(counts.values()) == {6}
    rates = [rate for _, rate in trials("lowrank", settings)]
    assert rates[0] == 1e-3 and abs(rates[-1] - 1e-2) < 1e-12
    assert all(b / a == pytest.approx(rates[1] / rates[0]) for a, b in zip(rates, rates[1:]))
    blocks = {structure["num_blocks"] for structure, _ in trials("nanomoe-full", settings)}
    assert blocks == {4, 16, 64}
    experts = {structure["moe_experts"] for structure, _ in trials("moe", settings)}
    assert experts == {2, 4, 8}
    with pytest.raises(ValueError, match=r"as many entries .*monarch_blocks=\(2,\)"):
        Settings(LAYER_KINDS, (0.25,), "params", (1e-3,), (0,), (4, 16), (2,))
    with pytest.raises(ValueError, match=r"as many entries .*moe_experts=\(2, 4, 8\)"):
        Settings(("moe", "nanomoe-scalar"), (0.25,), "params", (1e-3,), (0,), (4, 16))
    Settings(("lowrank", "nanomoe-scalar"), (0.25,), "params", (1e-3,), (0,), (4, 16))
    with pytest.raises(ValueError, match=r"as many entries .*block_counts=\(4, 16\)"):
        Settings(("lowrank", "moe"), (0.25,), "params", (1e-3,), (0,), (4, 16), moe_experts=(2,))


def test_same_seed_same_result() -> None:
    settings = Settings(
        ("lowrank", "nanomoe-scalar"), (0.25,), "params", (3e-3,), (0,), (4,), (4,), steps=5
    )
    first, second = (compare([make_task("digits", "tiny")], settings) for _ in range(2))
    assert [(r.val, r.test, r.train_loss) for r in first] == [
        (r.val, r.test, r.train_loss) for r in second
    ]


def test_module_entry_point(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "nanomoe",
        "compare",
        "--tasks",
        "teacher",
        "--kinds",
        "dense",
        "--size",
        "tiny",
        "--steps",
        "2",
        "--lrs",
        "1e-3",
        "--seeds",
        "0",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "compare.json").exists()


def test_structures_over_budget_are_skipped() -> None:
    # At 1/2 of a tiny teacher's layers (16 -> 32 -> 16), a 16 x 16 gate is over budget: K = 1 runs.
    settings = Settings(
        ("nanomoe-scalar",), (0.5,), "params", (3e-3,), (0,), (1, 16), (1, 2), (1, 2)
    )
    runs = compare([make_task("teacher", "tiny")], settings)
    assert [run.layers[0]["num_blocks"] for run in runs] == [1]


def test_a_layer_type_that_never_fits_is_left_out(capsys: pytest.CaptureFixture) -> None:
    # At 1/4 of the tiny teacher's parameters no routed MoE fits (its router and output bias
    # alone take half of it); the other types still run, and the progress count still adds up.
    settings = Settings(
        ("lowrank", "moe"), (0.25, 0.5), "params", (3e-3,), (0, 1), (1,), (1,), (2,), steps=2
    )
    with tqdm(total=run_count(settings, 1)) as progress:
        runs = compare_task(make_task("teacher", "tiny"), settings, progress)
        assert progress.n == progress.total
    assert sorted((run.kind, run.budget) for run in runs) == [
        ("lowrank", 0.25),
        ("lowrank", 0.25),
        ("lowrank", 0.5),
        ("lowrank", 0.5),
        ("moe", 0.5),
        ("moe", 0.5),
    ]
    assert "teacher: no moe structure fits 0.25 of the dense layers" in capsys.readouterr().out
