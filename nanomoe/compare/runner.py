"""Training runs of the comparison: one model per (task, layer type, budget, learning rate, seed).

Every layer type gets the same budget of trials: its structure (NanoMoE's block count, Monarch's,
the routed MoE's expert count) and the learning rate are tuned together on a small grid by
held-out (validation) quality with the first seed, and the best pair is then trained with every
seed and reported on the test split. A layer type with no structure to choose (dense, low-rank)
spends the same number of trials on a finer learning-rate grid over the same range. Dense
``nn.Linear`` has no budget and runs once per task. A structure whose layers cannot fit the budget
is no candidate; a layer type none of whose structures fit is left out of that budget's results
(a routed MoE at a small parameter budget).
"""

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from nanomoe.compare import LinearFactory, data_parallel
from nanomoe.compare.layers import describe_layer, layer_factory
from nanomoe.compare.moe import RoutedMoE, balance_loss
from nanomoe.compare.tasks import Task

CURVE_POINTS = 50  # training-loss samples kept per run, for the loss-curve plot


@dataclass(frozen=True)
class Settings:
    kinds: tuple[str, ...]
    budgets: tuple[float, ...]  # fractions of each dense layer's parameters (or multiply-adds)
    budget_kind: str  # "params" or "flops"
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    block_counts: tuple[int, ...] = (4, 16, 64)  # NanoMoE's K, tuned with the learning rate
    monarch_blocks: tuple[int, ...] = (2, 4, 8)  # Monarch's block count, likewise
    moe_experts: tuple[int, ...] = (2, 4, 8)  # the routed MoE's expert count, likewise
    steps: Optional[int] = None  # None: each task's own default

    def __post_init__(self) -> None:
        grids = {  # the grids that set each compared type's trials (dense, low-rank: block_counts)
            "block_counts": any(kind not in ("monarch", "moe") for kind in self.kinds),
            "monarch_blocks": "monarch" in self.kinds,
            "moe_experts": "moe" in self.kinds,
        }
        used = {name: getattr(self, name) for name, compared in grids.items() if compared}
        if len({len(grid) for grid in used.values()}) > 1:
            listed = ", ".join(f"{name}={grid}" for name, grid in used.items())
            raise ValueError(
                f"the structure grids need as many entries (the same trials for every layer "
                f"type), got {listed}"
            )


@dataclass
class Run:
    """One trained model and what was measured on it."""

    task: str
    kind: str
    budget: float
    learning_rate: float
    seed: int
    layers: list[dict]  # describe_layer of every compared layer
    params: int  # of the compared layers
    macs: int  # per row through the compared layers
    model_params: int
    steps: int
    train_loss: float  # mean over the last tenth of training
    val: dict[str, float]
    test: dict[str, float]
    step_ms: float
    memory_mib: float  # parameters + Adam state + activations saved by one training step
    curve: list[tuple[int, float]] = field(default_factory=list)


class RecordingFactory:
    """A LinearFactory that remembers every layer it made: the layers under comparison."""

    def __init__(self, make: LinearFactory) -> None:
        self.make = make
        self.made: list[nn.Module] = []

    def __call__(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        layer = self.make(in_features, out_features, bias)
        self.made.append(layer)
        return layer


def saved_activation_bytes(task: Task, model: nn.Module, batch: tuple) -> int:
    """Bytes of the tensors autograd saves for the backward of one training step."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        task.loss(model, *batch)
    return total


def memory_mib(task: Task, model: nn.Module, batch: tuple) -> float:
    """Training memory that differs between layer types: parameters, their gradients and Adam's
    two moments (4 copies), plus one step's saved activations. Exact, so comparable run to run."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return (4 * params + saved_activation_bytes(task, model, batch)) / 2**20


def train(
    task: Task,
    config: tuple[str, float, LinearFactory],
    learning_rate: float,
    seed: int,
    steps: int,
) -> Run:
    """Trains one model of a configuration (kind, budget, factory) from scratch and measures it.

    Under torchrun, each rank trains on its slice of every global batch (``data_parallel``)."""
    kind, budget, factory = config
    recorder = RecordingFactory(factory)
    torch.manual_seed(seed)
    model = task.build(recorder, seed)
    routed = [module for module in model.modules() if isinstance(module, RoutedMoE)]
    for module in routed:
        module.mean_over_ranks = data_parallel.global_mean
    trained = data_parallel.wrap(model, unused_parameters=bool(routed))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    batches = task.train_batches(seed)
    losses: list[float] = []
    warmup = min(5, steps // 10)  # first steps pay one-off costs (allocation, lazy init)
    started = time.perf_counter()
    first_batch: Optional[tuple] = None
    for step in range(steps):
        if step == warmup:
            started = time.perf_counter()
        batch = next(batches)
        first_batch = first_batch or batch
        model.train()
        loss = task.loss(trained, *data_parallel.local_slice(batch))
        optimizer.zero_grad(set_to_none=True)
        (loss + balance_loss(model)).backward()
        optimizer.step()
        losses.append(loss.item())  # this rank's slice; the global mean once, after the loop
    elapsed = time.perf_counter() - started
    assert first_batch is not None, "steps must be >= 1"
    losses = data_parallel.global_mean(torch.tensor(losses, dtype=torch.float64)).tolist()
    every = max(1, steps // CURVE_POINTS)
    curve = [(step + 1, losses[step]) for step in range(steps) if step % every == 0]
    if (steps - 1) % every:
        curve.append((steps, losses[-1]))
    tail = losses[-max(1, steps // 10) :]
    layers = [describe_layer(layer) for layer in recorder.made]
    return Run(
        task=task.name,
        kind=kind,
        budget=budget,
        learning_rate=learning_rate,
        seed=seed,
        layers=layers,
        params=sum(layer["params"] for layer in layers),
        macs=sum(layer["macs"] for layer in layers),
        model_params=sum(p.numel() for p in model.parameters()),
        steps=steps,
        train_loss=sum(tail) / len(tail),
        val=task.evaluate(model, "val"),
        test=task.evaluate(model, "test"),
        step_ms=1e3 * elapsed / max(1, steps - warmup),
        memory_mib=memory_mib(task, model, first_batch),  # one process's, for the global batch
        curve=curve,
    )


def quality(task: Task, scores: dict[str, float]) -> float:
    """The held-out metric as a number to maximize; a diverged run scores worst."""
    value = scores[task.metric]
    if not math.isfinite(value):
        return -math.inf
    return value if task.higher_is_better else -value


def configurations(settings: Settings) -> list[tuple[str, float]]:
    """(layer type, budget) pairs: dense once (at budget 1), every other type at every budget."""
    pairs: list[tuple[str, float]] = []
    for kind in settings.kinds:
        budgets = (1.0,) if kind == "dense" else settings.budgets
        pairs += [(kind, budget) for budget in budgets]
    return pairs


Structure = dict[str, int]  # layer_factory's structural arguments: num_blocks, monarch_blocks...


def spread(rates: tuple[float, ...], count: int) -> tuple[float, ...]:
    """``count`` learning rates evenly spaced in log over the range of ``rates``."""
    low, high = min(rates), max(rates)
    if count <= len(rates) or low == high:
        return rates
    return tuple(low * (high / low) ** (i / (count - 1)) for i in range(count))


def trials(kind: str, settings: Settings) -> list[tuple[Structure, float]]:
    """The (structure, learning rate) pairs tried for a layer type: as many for every type."""
    rates = settings.learning_rates
    if kind.startswith("nanomoe-"):
        return [({"num_blocks": k}, rate) for k in settings.block_counts for rate in rates]
    if kind == "monarch":
        return [({"monarch_blocks": b}, rate) for b in settings.monarch_blocks for rate in rates]
    if kind == "moe":
        return [({"moe_experts": e}, rate) for e in settings.moe_experts for rate in rates]
    return [({}, rate) for rate in spread(rates, len(settings.block_counts) * len(rates))]


def run_count(settings: Settings, tasks: int) -> int:
    extra_seeds = len(settings.seeds) - 1
    per_task = sum(
        len(trials(kind, settings)) + extra_seeds for kind, _ in configurations(settings)
    )
    return tasks * per_task


def labelled_run(
    task: Task,
    config: tuple[str, float, LinearFactory],
    rate: float,
    seed: int,
    steps: int,
    progress: Optional[tqdm],
) -> Run:
    """One training run of a configuration (kind, budget, factory), shown on the progress bar."""
    kind, budget, _ = config
    if progress is not None:
        progress.set_postfix_str(f"{task.name} {kind} {budget:g} lr={rate:g} seed={seed}")
    run = train(task, config, rate, seed, steps)
    if progress is not None:
        progress.update()
    return run


def fits(task: Task, factory: LinearFactory) -> bool:
    """Whether every layer of the task's model can be built within the factory's budget."""
    try:
        task.make_model(factory)
    except ValueError:
        return False
    return True


def compare_task(task: Task, settings: Settings, progress: Optional[tqdm] = None) -> list[Run]:
    """Every configuration of one task: tune the structure and learning rate, then train every seed
    with the best pair. The tuning run of the first seed is reused as that seed's result."""
    steps = settings.steps or task.steps
    runs: list[Run] = []
    for kind, budget in configurations(settings):
        first = settings.seeds[0]
        tuning = []
        for structure, rate in trials(kind, settings):
            config = (kind, budget, layer_factory(kind, budget, settings.budget_kind, **structure))
            if not fits(task, config[2]):  # e.g. a gate of K^2 terms over budget: not a candidate
                if progress is not None:
                    progress.update()
                continue
            tuning.append((labelled_run(task, config, rate, first, steps, progress), config))
        if not tuning:
            message = f"{task.name}: no {kind} structure fits {budget:g} of the dense layers"
            if data_parallel.is_main():
                tqdm.write(f"{message}; left out")
            if progress is not None:
                progress.update(len(settings.seeds) - 1)
            continue
        best, config = max(tuning, key=lambda pair: quality(task, pair[0].val))
        runs.append(best)
        runs += [
            labelled_run(task, config, best.learning_rate, seed, steps, progress)
            for seed in settings.seeds[1:]
        ]
    return runs


def compare(
    tasks: list[Task],
    settings: Settings,
    on_task_done: Optional[Callable[[list[Run]], None]] = None,
) -> list[Run]:
    """The whole comparison, with a progress bar over every training run."""
    runs: list[Run] = []
    for task in tasks:
        data_parallel.check_batch(task.batch_size, task.name)
    total = run_count(settings, len(tasks))
    quiet = not data_parallel.is_main()
    with tqdm(total=total, desc="training", unit="run", disable=quiet) as progress:
        for task in tasks:
            task_runs = compare_task(task, settings, progress)
            runs += task_runs
            if on_task_done is not None:
                on_task_done(runs)
    return runs
