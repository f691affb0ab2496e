"""Where NanoMoE wins, ties or loses, task by task, read from ``nanomoe compare`` result files.

Against each baseline, NanoMoE is its best variant at a budget, picked by validation quality (never
by the test split it is then judged on): so NanoMoE as a whole had four variants' trials to the
baseline's one, as a user who tries every variant would. Three views:

- equal parameters: a run with ``--budget-kind params``, same budget;
- equal multiply-adds: a run with ``--budget-kind flops``, same budget;
- equal wall-clock: the baseline may use any of its budgets whose training step is no slower than
  NanoMoE's (each run trains for the same number of steps, so the same time per step is the same
  training time); with none that fast, there is no verdict.

A difference of means within the sum of the two standard deviations over seeds is a tie; with
fewer than two seeds on a side there is no verdict, and a diverged run (a metric that is not
finite) is the worst result there is.

    python -m nanomoe.compare.verdict results/compare.json results/flops/compare.json
"""

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

BASELINES = ("lowrank", "monarch", "moe", "dense")
NAMES = {"lowrank": "low-rank", "monarch": "Monarch", "moe": "routed MoE", "dense": "dense"}
TIME_TOLERANCE = 1.05  # step times within 5% count as equal (the machine is shared and noisy)


@dataclass(frozen=True)
class Result:
    """One row of a compare summary: what the verdicts need."""

    task: str
    kind: str
    budget: float
    test_mean: float
    test_std: float
    val_mean: float
    step_ms: float
    seeds: int


def load(path: Path) -> tuple[list[Result], dict[str, bool]]:
    """A compare.json's rows, and per task whether higher is better."""
    payload = json.loads(path.read_text())
    fields = Result.__dataclass_fields__
    rows = [Result(**{key: row[key] for key in fields}) for row in payload["summary"]]
    return rows, payload["higher_is_better"]


def score(value: float, higher_is_better: bool) -> float:
    """A metric as a number to maximize; not finite (diverged) is the worst."""
    if not math.isfinite(value):
        return -math.inf
    return value if higher_is_better else -value


def compare_means(mine: Result, theirs: Result, higher_is_better: bool) -> str:
    """``"win"``, ``"tie"``, ``"lose"`` for ``mine`` on the test metric, or ``"-"`` (too few
    seeds to tell)."""
    if min(mine.seeds, theirs.seeds) < 2:
        return "-"
    ours, others = (
        score(mine.test_mean, higher_is_better),
        score(theirs.test_mean, higher_is_better),
    )
    if ours == others or abs(ours - others) <= mine.test_std + theirs.test_std:
        return "tie"
    return "win" if ours > others else "lose"


def best_nanomoe(rows: list[Result], task: str, budget: float, higher: bool) -> Optional[Result]:
    """NanoMoE's variant with the best validation quality at a budget."""
    candidates = [
        r for r in rows if r.task == task and r.budget == budget and r.kind.startswith("nanomoe-")
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda r: score(r.val_mean, higher))


def at_same_time(rows: list[Result], mine: Result, kind: str, higher: bool) -> Optional[Result]:
    """The baseline's best-validated row among those whose step is no slower than ``mine``'s."""
    fast = [
        r
        for r in rows
        if r.task == mine.task and r.kind == kind and r.step_ms <= mine.step_ms * TIME_TOLERANCE
    ]
    if not fast:
        return None
    return max(fast, key=lambda r: score(r.val_mean, higher))


def verdicts(
    rows: list[Result], higher: dict[str, bool], task: str, kind: str, by_time: bool
) -> list[str]:
    """One verdict per budget of the task (``"-"`` where one side is missing)."""
    budgets = sorted({r.budget for r in rows if r.task == task and r.kind != "dense"}, reverse=True)
    out = []
    for budget in budgets:
        mine = best_nanomoe(rows, task, budget, higher[task])
        theirs: Optional[Result]
        if mine is not None and by_time:
            theirs = at_same_time(rows, mine, kind, higher[task])
        else:
            same = (r for r in rows if r.task == task and r.kind == kind)
            theirs = next((r for r in same if kind == "dense" or r.budget == budget), None)
        out.append(
            "-" if mine is None or theirs is None else compare_means(mine, theirs, higher[task])
        )
    return out


def tally(marks: list[str]) -> str:
    """``["win", "tie", "win", "-"]`` -> ``"2 W, 1 T, 1 -"`` (``-``: no verdict at that budget)."""
    counts = [(marks.count(word), word[0].upper()) for word in ("win", "tie", "lose")]
    counts.append((marks.count("-"), "-"))
    return ", ".join(f"{count} {letter}" for count, letter in counts if count)


def verdict_table(params: list[Result], flops: list[Result], higher: dict[str, bool]) -> str:
    """Markdown: per task and baseline, NanoMoE's wins, ties and losses over the budgets."""
    lines = [
        "| task | against | equal parameters | equal multiply-adds | equal wall-clock |",
        "| --- | --- | --- | --- | --- |",
    ]
    for task in dict.fromkeys(r.task for r in params):
        for kind in BASELINES:
            if not any(r.task == task and r.kind == kind for r in params + flops):
                continue
            cells = [
                tally(verdicts(params, higher, task, kind, by_time=False)),
                tally(verdicts(flops, higher, task, kind, by_time=False)),
                tally(verdicts(params, higher, task, kind, by_time=True)),
            ]
            lines.append(f"| {task} | {NAMES[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: Optional[Result], best: Optional[Result]) -> str:
    """A test mean, in bold when it is the best of its budget; "-" for a layer left out there."""
    if row is None:
        return "-"
    return f"**{row.test_mean:.4g}**" if row is best else f"{row.test_mean:.4g}"


def quality_table(rows: list[Result], higher: dict[str, bool]) -> str:
    """Markdown: a row per layer type, a column per task with its test means at every budget (the
    best compressed layer of each budget in bold)."""
    tasks = list(dict.fromkeys(r.task for r in rows))
    budgets = sorted({r.budget for r in rows if r.kind != "dense"}, reverse=True)
    names = ", ".join(f"1/{round(1 / b)}" for b in budgets)
    lines = [
        "| layer | " + " | ".join(f"{task} ({names})" for task in tasks) + " |",
        "| --- |" + " --- |" * len(tasks),
    ]
    best = {}
    for task in tasks:
        for budget in budgets:
            group = [r for r in rows if r.task == task and r.budget == budget]
            if group:
                best[task, budget] = max(group, key=lambda r: score(r.test_mean, higher[task]))
    for kind in dict.fromkeys(r.kind for r in rows):
        cells = []
        for task in tasks:
            mine = {r.budget: r for r in rows if r.task == task and r.kind == kind}
            if kind == "dense":
                marks = [f"{r.test_mean:.4g}" for r in mine.values()]
            else:
                marks = [_cell(mine.get(b), best.get((task, b))) for b in budgets]
            cells.append(", ".join(marks))
        lines.append(f"| {NAMES.get(kind, kind)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("params", type=Path, help="compare.json of a --budget-kind params run")
    parser.add_argument("flops", type=Path, help="compare.json of a --budget-kind flops run")
    args = parser.parse_args(argv)
    params, higher = load(args.params)
    flops, _ = load(args.flops)
    for title, rows in (("equal parameters", params), ("equal multiply-adds", flops)):
        print(f"Test quality at {title}:\n\n{quality_table(rows, higher)}\n")
    print(
        f"NanoMoE's best variant against each baseline:\n\n{verdict_table(params, flops, higher)}"
    )


if __name__ == "__main__":
    main()
