"""The comparison's results: a summary per (task, layer type, budget) over seeds, printed as a
table, written as JSON, and drawn as plots (held-out quality against parameters, multiply-adds and
time per step; training-loss curves)."""

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nanomoe.compare.runner import Run

CONFIG_KEYS = (
    ("num_blocks", "K"),
    ("rank", "r"),
    ("blocks", "b"),
    ("width", "w"),
    ("experts", "E"),
    ("hidden", "h"),
)


@dataclass
class Summary:
    task: str
    kind: str
    budget: float
    config: str  # of the first compared layer, e.g. "K=8 r=11"
    params: int
    macs: int
    learning_rate: float
    metric: str
    seeds: int
    test_mean: float
    test_std: float
    val_mean: float
    train_loss: float
    step_ms: float
    memory_mib: float


def layer_config(layer: dict) -> str:
    return " ".join(f"{short}={layer[key]}" for key, short in CONFIG_KEYS if key in layer)


def summarize(runs: list[Run], metrics: dict[str, str]) -> list[Summary]:
    """One row per (task, kind, budget), in the order the runs came; metrics maps task -> metric."""
    groups: dict[tuple[str, str, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.task, run.kind, run.budget), []).append(run)
    rows = []
    for (task, kind, budget), group in groups.items():
        metric = metrics[task]
        tests = [run.test[metric] for run in group]
        first = group[0]
        rows.append(
            Summary(
                task=task,
                kind=kind,
                budget=budget,
                config=layer_config(first.layers[0]) if first.layers else "",
                params=first.params,
                macs=first.macs,
                learning_rate=first.learning_rate,
                metric=metric,
                seeds=len(group),
                test_mean=statistics.fmean(tests),
                test_std=statistics.stdev(tests) if len(tests) > 1 else 0.0,
                val_mean=statistics.fmean(run.val[metric] for run in group),
                train_loss=statistics.fmean(run.train_loss for run in group),
                step_ms=statistics.fmean(run.step_ms for run in group),
                memory_mib=first.memory_mib,
            )
        )
    return rows


def format_table(rows: list[Summary]) -> str:
    header = (
        f"{'task':8} {'layer':24} {'budget':>7} {'config':10} {'params':>9} {'MACs/row':>9} "
        f"{'lr':>7} {'train loss':>10} {'test metric (mean ± std, seeds)':>34} {'ms/step':>8} "
        f"{'MiB':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        budget = "-" if row.kind == "dense" else f"1/{round(1 / row.budget)}"
        test = f"{row.metric} {row.test_mean:.4f} ± {row.test_std:.4f} ({row.seeds})"
        lines.append(
            f"{row.task:8} {row.kind:24} {budget:>7} {row.config:10} {row.params:>9,} "
            f"{row.macs:>9,} {row.learning_rate:>7.0e} {row.train_loss:>10.4f} {test:>34} "
            f"{row.step_ms:>8.2f} {row.memory_mib:>7.2f}"
        )
    return "\n".join(lines)


def write_json(
    path: Path,
    settings: Any,
    machine: dict,
    higher_is_better: dict[str, bool],
    runs: list[Run],
    rows: list[Summary],
) -> None:
    """The settings, the machine, per task whether its metric is better higher, the summary rows
    and every run."""
    payload = {
        "settings": asdict(settings),
        "machine": machine,
        "higher_is_better": higher_is_better,
        "summary": [asdict(row) for row in rows],
        "runs": [asdict(run) for run in runs],
    }
    path.write_text(json.dumps(payload, indent=1))


def plot(out: Path, rows: list[Summary], runs: list[Run]) -> list[Path]:
    """compare-TASK.png (test quality against parameters, multiply-adds, time per step) and
    curves-TASK.png (training loss) per task. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in dict.fromkeys(row.task for row in rows):
        task_rows = [row for row in rows if row.task == task]
        figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for kind in dict.fromkeys(row.kind for row in task_rows):
            line = sorted((row for row in task_rows if row.kind == kind), key=lambda r: r.params)
            style = {"marker": "*", "markersize": 12} if kind == "dense" else {"marker": "o"}
            for axis, x_of in zip(axes, ("params", "macs", "step_ms")):
                xs = [getattr(row, x_of) for row in line]
                means = [row.test_mean for row in line]
                stds = [row.test_std for row in line]
                axis.errorbar(xs, means, yerr=stds, label=kind, capsize=3, **style)
        labels = ("parameters of the compared layers", "multiply-adds per row", "ms per step")
        for axis, label in zip(axes, labels):
            axis.set_xlabel(label)
            axis.set_ylabel(f"test {task_rows[0].metric}")
            axis.set_xscale("log")
            axis.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        figure.suptitle(
            f"{task}: held-out quality at equal budgets (learning rate tuned per layer)"
        )
        figure.tight_layout()
        path = out / f"compare-{task}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
        written.append(plot_curves(out, task, [run for run in runs if run.task == task]))
    return written


def plot_curves(out: Path, task: str, runs: list[Run]) -> Path:
    """Training loss of the first seed of every configuration, one panel per budget."""
    import matplotlib.pyplot as plt

    budgets = sorted({run.budget for run in runs if run.kind != "dense"}, reverse=True)
    figure, axes = plt.subplots(1, max(1, len(budgets)), figsize=(5 * max(1, len(budgets)), 4))
    axes = list(axes) if len(budgets) > 1 else [axes]
    first_seed = min(run.seed for run in runs)
    for axis, budget in zip(axes, budgets or [1.0]):
        for run in runs:
            if run.seed != first_seed or (run.kind != "dense" and run.budget != budget):
                continue
            steps, losses = zip(*run.curve)
            axis.plot(steps, losses, label=run.kind, linewidth=1)
        axis.set_title(f"budget 1/{round(1 / budget)}")
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{task}: training loss (first seed, tuned learning rate)")
    figure.tight_layout()
    path = out / f"curves-{task}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
