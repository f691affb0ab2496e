"""The block count against the rank at a fixed budget: the measurement behind num_blocks="auto".

For each task, budget and mixing, NanoMoE is trained at each square block count ``K`` (``K_out =
K_in = K``, the rank then the largest that fits the budget), the learning rate tuned on held-out
data over the same grid for every ``K``; the test metric of the tuned run is reported next to the
``K`` and rank the layers got. The teacher task runs at two spectra: its own power law
(``decay=1``, a nearly low-rank target) and flat (``decay=0``, a target that needs a high rank).
``nanomoe.budget.auto_config`` encodes what this shows.

    python benchmarks/block_count.py                       # teachers and digits, budgets 1/8, 1/16
    python benchmarks/block_count.py --tasks teacher --blocks 1 4 16 64 --budgets 0.125
"""

import argparse
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nanomoe.compare.layers import layer_factory
from nanomoe.compare.runner import quality, train
from nanomoe.compare.tasks import TASKS, TEACHER_SIZES, Task, TeacherTask, make_task


@dataclass
class Point:
    task: str
    mixing: str
    budget: float
    requested_blocks: int
    layers: list[tuple[Any, int]]  # (K, rank) of each compared layer, as built
    params: int
    learning_rate: float
    metric: str
    test: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["teacher", "digits"])
    parser.add_argument("--mixings", nargs="+", default=["scalar", "diagonal"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[1 / 8, 1 / 16])
    parser.add_argument("--blocks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 1e-2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=("tiny", "default", "full"), default="default")
    parser.add_argument(
        "--teacher-decays", nargs="+", type=float, default=[1.0, 0.0], help="teacher spectra"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/block-count.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tasks = make_tasks(args.tasks, args.size, args.teacher_decays)
    jobs = [
        (name, mixing, budget, blocks)
        for name in tasks
        for mixing in args.mixings
        for budget in args.budgets
        for blocks in args.blocks
    ]
    points: list[Point] = []
    progress = tqdm(total=len(jobs) * len(args.lrs), desc="training", unit="run")
    for name, mixing, budget, blocks in jobs:
        task = tasks[name]
        kind = f"nanomoe-{mixing}"
        factory = layer_factory(kind, budget, "params", blocks)
        runs = []
        for rate in args.lrs:
            progress.set_postfix_str(f"{name} {mixing} {budget:g} K={blocks} lr={rate:g}")
            try:
                runs.append(train(task, (kind, budget, factory), rate, args.seed, task.steps))
            except ValueError as error:  # the gate alone is over budget at this K
                tqdm.write(f"skipped {name} {mixing} {budget:g} K={blocks}: {error}")
            progress.update()
        if not runs:
            continue
        best = max(runs, key=lambda run: quality(task, run.val))
        layers = [(layer["num_blocks"], layer["rank"]) for layer in best.layers]
        points.append(
            Point(
                name,
                mixing,
                budget,
                blocks,
                layers,
                best.params,
                best.learning_rate,
                task.metric,
                best.test[task.metric],
            )
        )
    progress.close()
    print_table(points)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(p) for p in points], indent=1))
    print(f"wrote {args.out}")
    try:
        plot(points, args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.png')}")
    except ModuleNotFoundError as error:  # matplotlib is optional
        print(f"no plot: {error.name} is not installed")


def make_tasks(names: list[str], size: str, teacher_decays: list[float]) -> dict[str, Task]:
    """The tasks by label; the teacher once per spectrum decay, labelled with it."""
    tasks: dict[str, Task] = {}
    for name in names:
        if name != "teacher":
            tasks[name] = make_task(name, size)
            continue
        for decay in teacher_decays:
            config = dataclasses.replace(TEACHER_SIZES[size], decay=decay)
            tasks[f"teacher decay={decay:g}"] = TeacherTask(config)
    return tasks


def print_table(points: list[Point]) -> None:
    print("| task | mixing | budget | K requested | (K, rank) per layer | params | lr | test |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in points:
        shapes = " ".join(f"({k}, {r})" for k, r in p.layers)
        print(
            f"| {p.task} | {p.mixing} | {p.budget:g} | {p.requested_blocks} | {shapes} | "
            f"{p.params} | {p.learning_rate:g} | {p.metric} {p.test:.4f} |"
        )


def plot(points: list[Point], path: Path) -> None:
    """One panel per task: the test metric against K, a line per (mixing, budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(p.task for p in points))
    figure, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for panel, name in zip(axes[0], names):
        mine = [p for p in points if p.task == name]
        for mixing, budget in dict.fromkeys((p.mixing, p.budget) for p in mine):
            line = [p for p in mine if p.mixing == mixing and p.budget == budget]
            panel.plot(
                [p.requested_blocks for p in line],
                [p.test for p in line],
                marker="o",
                label=f"{mixing}, {budget:g} of dense",
            )
        panel.set_xscale("log", base=2)
        panel.set_xlabel("block count K (rank: the largest in budget)")
        panel.set_ylabel(f"test {mine[0].metric}")
        panel.set_title(name)
        panel.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
