"""``nanomoe compare``: the paper's claim, side by side, on tasks that ship with the machine.

nanomoe compare                        # default: every task, budgets 1/4 1/8 1/16, 2 seeds
nanomoe compare --full                 # larger models, longer training, 3 seeds
nanomoe compare --tasks teacher --budget-kind flops --out results/flops
torchrun --nproc-per-node 2 -m nanomoe compare   # data-parallel: the same results, per global batch
"""

import argparse
import platform
import sys
from pathlib import Path
from typing import Optional

import torch

from nanomoe.compare import data_parallel, report
from nanomoe.compare.layers import LAYER_KINDS
from nanomoe.compare.runner import Settings, compare
from nanomoe.compare.tasks import TASKS, make_task


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanomoe compare", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--kinds", nargs="+", choices=LAYER_KINDS, default=list(LAYER_KINDS))
    p.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=[1 / 4, 1 / 8, 1 / 16],
        help="fractions of each dense layer's parameters (or multiply-adds)",
    )
    p.add_argument("--budget-kind", choices=("params", "flops"), default="params")
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 1e-2], help="Adam grid")
    p.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 (--full: 0 1 2)")
    p.add_argument(
        "--block-counts",
        nargs="+",
        type=int,
        default=[4, 16, 64],
        help="NanoMoE block counts K, tuned with the learning rate (dense and low-rank try as "
        "many learning rates instead)",
    )
    p.add_argument(
        "--monarch-blocks",
        nargs="+",
        type=int,
        default=[2, 4, 8],
        help="Monarch block counts, tuned likewise (every grid compared needs as many entries)",
    )
    p.add_argument(
        "--moe-experts",
        nargs="+",
        type=int,
        default=[2, 4, 8],
        help="routed-MoE expert counts (top-1 routing), tuned likewise (as many entries)",
    )
    p.add_argument("--steps", type=int, help="training steps (default: each task's own)")
    p.add_argument("--size", choices=("tiny", "default", "full"), help="task size")
    p.add_argument("--full", action="store_true", help="the larger settings: --size full, 3 seeds")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=Path("results"))
    return p


def machine() -> dict:
    return {
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "ranks": data_parallel.world_size(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: Optional[list[str]] = None) -> None:
    args = parser().parse_args(argv)
    created = data_parallel.start()
    try:
        run(args)
        data_parallel.barrier()  # rank 0 reports while the others wait
    finally:
        data_parallel.stop(created)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    size = args.size or ("full" if args.full else "default")
    seeds = tuple(args.seeds or ((0, 1, 2) if args.full else (0, 1)))
    settings = Settings(
        kinds=tuple(args.kinds),
        budgets=tuple(args.budgets),
        budget_kind=args.budget_kind,
        learning_rates=tuple(args.lrs),
        seeds=seeds,
        block_counts=tuple(args.block_counts),
        monarch_blocks=tuple(args.monarch_blocks),
        moe_experts=tuple(args.moe_experts),
        steps=args.steps,
    )
    tasks = [make_task(name, size) for name in args.tasks]
    metrics = {task.name: task.metric for task in tasks}
    higher_is_better = {task.name: task.higher_is_better for task in tasks}
    json_path = args.out / "compare.json"

    def save(runs: list) -> None:  # after every task, so a long run leaves results as it goes
        rows = report.summarize(runs, metrics)
        report.write_json(json_path, settings, machine(), higher_is_better, runs, rows)

    main_rank = data_parallel.is_main()  # the others train alongside it and report nothing
    if main_rank:
        args.out.mkdir(parents=True, exist_ok=True)
    runs = compare(tasks, settings, on_task_done=save if main_rank else None)
    if not main_rank:
        return
    rows = report.summarize(runs, metrics)
    table = report.format_table(rows)
    print(table)
    (args.out / "compare.txt").write_text(table + "\n")
    print(f"wrote {json_path} and {args.out / 'compare.txt'}")
    try:
        for path in report.plot(args.out, rows, runs):
            print(f"wrote {path}")
    except ModuleNotFoundError as error:
        print(f"no plots: {error.name} is not installed (pip install matplotlib)", file=sys.stderr)


if __name__ == "__main__":
    main()
