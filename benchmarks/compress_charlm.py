"""Compressing a trained model: NanoMoE fit against truncated SVD on ``nanomoe compare``'s charlm.

The character-level GPT of ``nanomoe compare`` (its ``default`` size: 2 layers, d=128, context 64)
is trained densely, then each budget and method starts from a copy of the trained model and
replaces its hidden layers (the attention projections and the MLP; embeddings and the LM head stay
dense) at the same parameter budget:

- NanoMoE fit: ``nanomoe.replace_linear`` (``init="fit"``, ``num_blocks="auto"``), per mixing;
- truncated SVD: ``LowRankLinear`` with ``up = U S^1/2``, ``down = S^1/2 V^T`` at the largest rank
  within the budget (``nanomoe.budget.lowrank_rank_for_budget``).

Held-out loss is measured right after compression and after a short fine-tune (Adam, the training
learning rate), with the mean relative Frobenius error of the replaced weights.

    python benchmarks/compress_charlm.py                       # ~6 minutes on one CPU thread
    python benchmarks/compress_charlm.py --budgets 0.25 --train-steps 300 --finetune-steps 50
"""

import argparse
import copy
import json
import math
import platform
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from svd_baseline import replace_svd
from torch import Tensor, nn
from tqdm import tqdm

import nanomoe
from nanomoe.compare.tasks import SIZES, Task, make_task
from nanomoe.layers import LowRankLinear

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN = r"^blocks\."  # the layers nanomoe compare compares: everything inside the GPT blocks
MIXINGS = ("scalar", "diagonal")
WHEN = ("before", "after")  # the fine-tune


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=SIZES, default="default", help="charlm size")
    p.add_argument("--budgets", nargs="+", type=float, default=[1 / 2, 1 / 4, 1 / 8])
    p.add_argument("--mixings", nargs="+", choices=MIXINGS, default=list(MIXINGS))
    p.add_argument(
        "--train-steps", type=int, default=2000, help="dense training (compare's default: 200)"
    )
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam, for training and fine-tuning")
    p.add_argument("--iters", type=int, default=30, help="fit_dense's iterations")
    p.add_argument("--seeds", type=int, default=3, help="repeats, each with its own dense model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "compress-charlm.json")
    p.add_argument("--no-plot", action="store_true")
    return p


def replace_nanomoe(model: nn.Module, budget: float, mixing: str, iters: int) -> Dict[str, Any]:
    """``replace_linear`` fit of the hidden layers, in place."""
    report = nanomoe.replace_linear(
        model, budget=budget, mixing=mixing, include=HIDDEN, iters=iters, progress=False
    )
    layers = report.replaced
    if not layers:
        raise RuntimeError(f"replace_linear replaced nothing at budget {budget} ({mixing})")
    return {
        "layers": len(layers),
        "weight_error": sum(layer.nanomoe_error for layer in layers) / len(layers),
        "svd_error": sum(layer.svd_error for layer in layers) / len(layers),
        "ranks": [layer.rank for layer in layers],
        "num_blocks": [list(layer.num_blocks) for layer in layers],
        "skipped": len(report.skipped),
    }


def hidden_params(model: nn.Module) -> int:
    """Parameters of the compressed layers (the LayerNorms of the blocks left out)."""
    kinds = (nn.Linear, LowRankLinear, nanomoe.NanoMoELinear)
    return sum(
        p.numel()
        for name, module in model.named_modules()
        if re.search(HIDDEN, name) and isinstance(module, kinds)
        for p in module.parameters()
    )


def fine_tune(task: Task, model: nn.Module, steps: int, lr: float, seed: int) -> float:
    """``steps`` Adam steps on the task's training batches for ``seed`` (runner.train's loop, on a
    given model); the mean training loss of the last tenth."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches: Iterator[Tuple[Tensor, Tensor]] = task.train_batches(seed)
    model.train()
    losses: List[float] = []
    for _ in range(steps):
        loss = task.loss(model, *next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail) if tail else math.nan


def run_seed(task: Task, args: argparse.Namespace, seed: int) -> Tuple[Dict[str, Any], List[Dict]]:
    """Train a dense model with ``seed``, then compress and fine-tune a copy per budget and
    method: the dense model's record and one row per (budget, method)."""
    started = time.perf_counter()
    # The same model and optimizer as nanomoe compare's dense runs (runner.train), kept here.
    torch.manual_seed(seed)
    dense = task.build(lambda i, o, b: nn.Linear(i, o, b), seed)
    dense_train_loss = fine_tune(task, dense, args.train_steps, args.lr, seed)
    dense.eval()
    dense_scores = {"val": task.evaluate(dense, "val"), "test": task.evaluate(dense, "test")}
    train_seconds = time.perf_counter() - started
    tqdm.write(f"seed {seed}, dense: test loss {dense_scores['test']['loss']:.4f}")
    dense_record = {
        "seed": seed,
        "hidden_params": hidden_params(dense),
        "train_loss": dense_train_loss,
        "train_seconds": train_seconds,
        **dense_scores,
    }
    methods = [f"nanomoe-{mixing}" for mixing in args.mixings] + ["svd"]
    rows = []
    jobs = [(budget, method) for budget in args.budgets for method in methods]
    for budget, method in tqdm(jobs, desc=f"compress, seed {seed}", unit="model"):
        model = copy.deepcopy(dense)
        began = time.perf_counter()
        if method == "svd":
            info = replace_svd(model, budget, HIDDEN)
        else:
            info = replace_nanomoe(model, budget, method.removeprefix("nanomoe-"), args.iters)
        compress_seconds = time.perf_counter() - began
        before = {"val": task.evaluate(model, "val"), "test": task.evaluate(model, "test")}
        began = time.perf_counter()
        # The same fine-tuning batches for every method, other than any seed's dense training's.
        train_loss = fine_tune(task, model, args.finetune_steps, args.lr, seed + 1000)
        after = {"val": task.evaluate(model, "val"), "test": task.evaluate(model, "test")}
        rows.append(
            {
                "seed": seed,
                "budget": budget,
                "method": method,
                "hidden_params": hidden_params(model),
                "before": before,
                "after": after,
                "finetune_train_loss": train_loss,
                "compress_seconds": compress_seconds,
                "finetune_seconds": time.perf_counter() - began,
                **info,
            }
        )
    return dense_record, rows


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    task = make_task("charlm", args.size)
    started = time.perf_counter()
    dense, rows = [], []
    for seed in range(args.seeds):
        dense_record, seed_rows = run_seed(task, args, seed)
        dense.append(dense_record)
        rows += seed_rows
    return {
        "settings": {key: v for key, v in vars(args).items() if key != "out"},
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "dense": dense,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }


def mean_std(values: List[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    spread = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(spread)


def summary(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per (budget, method), in the rows' order: params and, over seeds, the mean and standard
    deviation of the weight error, of the test loss before and after the fine-tune, and of that
    loss minus SVD's on the same dense model (``None`` for SVD itself)."""
    groups: Dict[Tuple[float, str], List[Dict[str, Any]]] = {}
    for row in result["rows"]:
        groups.setdefault((row["budget"], row["method"]), []).append(row)

    def loss(row: Dict[str, Any], when: str) -> float:
        return row[when]["test"]["loss"]

    summaries = []
    for (budget, method), rows in groups.items():
        svd = {row["seed"]: row for row in groups.get((budget, "svd"), [])}
        paired = method != "svd" and all(row["seed"] in svd for row in rows)
        entry: Dict[str, Any] = {
            "budget": budget,
            "method": method,
            "seeds": len(rows),
            "hidden_params": rows[0]["hidden_params"],
            "weight_error": mean_std([row["weight_error"] for row in rows]),
        }
        for when in WHEN:
            entry[when] = mean_std([loss(row, when) for row in rows])
            differences = [loss(row, when) - loss(svd[row["seed"]], when) for row in rows]
            entry[f"{when}_vs_svd"] = mean_std(differences) if paired else None
        summaries.append(entry)
    return summaries


def table(result: Dict[str, Any]) -> str:
    """Markdown: the weight error and the held-out (test) loss before and after the fine-tune,
    as mean ± standard deviation over the seeds; for NanoMoE, in brackets, its loss minus SVD's
    on the same dense model, over the seeds too."""
    steps = result["settings"]["finetune_steps"]
    lines = [
        f"| budget | method | params | weight error | test loss | after {steps}-step fine-tune |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def cell(pair: Tuple[float, float]) -> str:
        return f"{pair[0]:.3f} ± {pair[1]:.3f}"

    def loss_cell(row: Dict[str, Any], when: str) -> str:
        paired = row[f"{when}_vs_svd"]
        vs_svd = "" if paired is None else f" ({paired[0]:+.3f} ± {paired[1]:.3f})"
        return cell(row[when]) + vs_svd

    dense = result["dense"]
    loss = mean_std([record["test"]["loss"] for record in dense])
    lines.append(f"| 1 | dense | {dense[0]['hidden_params']:,} | 0 | {cell(loss)} | - |")
    for row in summary(result):
        lines.append(
            f"| 1/{1 / row['budget']:g} | {row['method']} | {row['hidden_params']:,} | "
            f"{cell(row['weight_error'])} | {loss_cell(row, 'before')} | "
            f"{loss_cell(row, 'after')} |"
        )
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: Path) -> None:
    """Test loss against budget: dense, then each method before (dashed) and after (solid),
    the mean over seeds with a bar of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    dense = mean_std([record["test"]["loss"] for record in result["dense"]])[0]
    axes.axhline(dense, color="black", linewidth=1, label="dense")
    rows = summary(result)
    methods = dict.fromkeys(row["method"] for row in rows)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, method in zip(colors, methods):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        budgets = [r["budget"] for r in points]
        name = method.replace("nanomoe-", "NanoMoE fit ").replace("svd", "truncated SVD")
        for when, style, marker in (("before", "--", "o"), ("after", "-", "s")):
            means, stds = zip(*(r[when] for r in points))
            label = f"{name}, {'after fine-tune' if when == 'after' else 'no fine-tune'}"
            axes.errorbar(
                budgets,
                means,
                yerr=stds,
                fmt=style,
                marker=marker,
                color=color,
                label=label,
                capsize=3,
            )
    axes.set_xscale("log", base=2)
    budgets = sorted({row["budget"] for row in rows})
    axes.set_xticks(budgets, [f"1/{1 / b:g}" for b in budgets])
    axes.set_xlabel("budget (fraction of each hidden layer's parameters)")
    axes.set_ylabel("held-out (test) loss, nats/char")
    steps = result["settings"]["finetune_steps"]
    seeds = result["settings"]["seeds"]
    axes.set_title(
        f"charlm compressed after dense training; fine-tune {steps} steps; {seeds} seeds"
    )
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parser().parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"{result['seconds']:.0f} s; wrote {args.out}")
    if not args.no_plot:
        picture = args.out.with_suffix(".png")
        plot(result, picture)
        print(f"wrote {picture}")
    return result


if __name__ == "__main__":
    main()
