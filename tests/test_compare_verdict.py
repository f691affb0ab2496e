"""Win / tie / lose verdicts from compare results, on hand-made rows."""

import json
from pathlib import Path

from nanomoe.compare.verdict import (
    Result,
    compare_means,
    load,
    main,
    quality_table,
    tally,
    verdict_table,
    verdicts,
)


def row(
    kind: str,
    budget: float,
    test: float,
    std: float = 0.01,
    val: float = 0.0,
    ms: float = 1.0,
    seeds: int = 2,
) -> Result:
    return Result("teacher", kind, budget, test, std, val or test, ms, seeds)


def test_means_within_the_spread_tie() -> None:
    mine, theirs = row("nanomoe-scalar", 0.25, 0.50), row("lowrank", 0.25, 0.515)
    assert compare_means(mine, theirs, higher_is_better=False) == "tie"  # 0.015 <= 0.01 + 0.01
    assert compare_means(mine, row("lowrank", 0.25, 0.53), higher_is_better=False) == "win"
    assert compare_means(mine, row("lowrank", 0.25, 0.53), higher_is_better=True) == "lose"
    assert compare_means(mine, row("lowrank", 0.25, 0.9, seeds=1), higher_is_better=False) == "-"


def test_a_diverged_run_is_the_worst() -> None:
    nan = float("nan")
    diverged_mine, diverged_theirs = row("nanomoe-scalar", 0.25, nan), row("lowrank", 0.25, nan)
    fine = row("lowrank", 0.25, 0.5)
    for higher in (True, False):
        assert compare_means(diverged_mine, fine, higher) == "lose"
        assert compare_means(row("nanomoe-scalar", 0.25, 0.5), diverged_theirs, higher) == "win"
    # nor is a diverged variant picked by its (not finite) validation score
    rows = [row("nanomoe-scalar", 0.25, 0.6, val=nan), row("nanomoe-diagonal", 0.25, 0.6, val=0.7)]
    assert verdicts([*rows, fine], {"teacher": False}, "teacher", "lowrank", False) == ["lose"]


def test_nanomoe_is_its_best_validated_variant() -> None:
    # diagonal has the better test mean but the worse validation mean: scalar is the one judged
    rows = [
        row("nanomoe-scalar", 0.25, 0.60, val=0.40),
        row("nanomoe-diagonal", 0.25, 0.30, val=0.45),
        row("lowrank", 0.25, 0.50),
    ]
    assert verdicts(rows, {"teacher": False}, "teacher", "lowrank", by_time=False) == ["lose"]


def test_equal_wall_clock_lets_the_baseline_use_any_budget_as_fast() -> None:
    rows = [
        row("nanomoe-scalar", 0.25, 0.40, ms=2.0),
        row("nanomoe-scalar", 0.125, 0.50, ms=1.0),
        row("lowrank", 0.25, 0.45, ms=1.0),
        row("lowrank", 0.125, 0.60, ms=0.5),
        row("monarch", 0.25, 0.10, ms=9.0),  # better, but no Monarch row is as fast
        row("monarch", 0.125, 0.20, ms=9.0),
    ]
    higher = {"teacher": False}
    # at 1/4 NanoMoE takes 2 ms: low-rank's best row within 2 ms is its 1/4 (0.45): a win; at 1/8
    # (1 ms), low-rank's 1/4 also fits and beats NanoMoE's 0.50
    assert verdicts(rows, higher, "teacher", "lowrank", by_time=True) == ["win", "lose"]
    assert verdicts(rows, higher, "teacher", "monarch", by_time=True) == ["-", "-"]
    assert verdicts(rows, higher, "teacher", "monarch", by_time=False) == ["lose", "lose"]


def test_tables(tmp_path: Path) -> None:
    params = [
        row("dense", 1.0, 0.05),
        row("lowrank", 0.25, 0.45),
        row("lowrank", 0.125, 0.60),
        row("nanomoe-scalar", 0.25, 0.40),
        row("nanomoe-scalar", 0.125, 0.50),
    ]
    flops = [row("lowrank", 0.25, 0.30), row("nanomoe-scalar", 0.25, 0.40)]
    higher = {"teacher": False}
    assert tally(["win", "tie", "win"]) == "2 W, 1 T" and tally(["-", "lose"]) == "1 L, 1 -"
    table = verdict_table(params, flops, higher)
    assert (
        "| teacher | low-rank | 2 W | 1 L | 1 W, 1 L |" in table
    )  # at 1/8, low-rank 1/4 is as fast
    assert "| teacher | dense | 2 L | 1 - | 2 L |" in table
    quality = quality_table([*params, row("moe", 0.125, 0.7)], higher)
    assert "| routed MoE | -, 0.7 |" in quality  # left out at 1/4: its 1/8 result stays under 1/8
    assert "| layer | teacher (1/4, 1/8) |" in quality
    assert "| low-rank | 0.45, 0.6 |" in quality
    assert "| nanomoe-scalar | **0.4**, **0.5** |" in quality

    def write(rows: list[Result], name: str) -> Path:
        summary = [dict(r.__dict__, metric="nmse") for r in rows]
        path = tmp_path / name
        path.write_text(json.dumps({"summary": summary, "higher_is_better": higher}))
        return path

    loaded, loaded_higher = load(write(params, "params.json"))
    assert loaded == params and loaded_higher == higher
    main([str(write(params, "p.json")), str(write(flops, "f.json"))])
