"""nanomoe.compare.tasks: the training tasks at their tiny size, with dense and NanoMoE layers."""

import itertools
import math

import pytest
import torch
from torch import nn

import nanomoe
from nanomoe.compare import tasks
from nanomoe.compare.tasks import TASKS, make_task

pytest.importorskip("sklearn")

FACTORIES = {
    "dense": lambda i, o, b: nn.Linear(i, o, b),
    "nanomoe": lambda i, o, b: nanomoe.NanoMoELinear(i, o, rank=2, num_blocks=2, bias=b),
}
# Layers each tiny model builds through the factory, and plain nn.Linear layers it keeps.
COMPARED = {"charlm": 6, "digits": 2, "teacher": 2, "teacher-flat": 2}
PLAIN = {"charlm": 1, "digits": 1, "teacher": 0, "teacher-flat": 0}


@pytest.fixture(scope="module", params=TASKS)
def task(request: pytest.FixtureRequest) -> tasks.Task:
    return make_task(request.param, "tiny")


def first_batches(task: tasks.Task, seed: int, count: int = 3) -> list:
    return list(itertools.islice(task.train_batches(seed), count))


def test_attributes(task: tasks.Task) -> None:
    assert task.name in TASKS
    expected = {
        "charlm": ("bpc", False),
        "digits": ("accuracy", True),
        "teacher": ("nmse", False),
        "teacher-flat": ("nmse", False),
    }
    assert (task.metric, task.higher_is_better) == expected[task.name]
    assert task.steps > 0 and task.batch_size > 0
    inputs, targets = next(task.train_batches(0))
    # Rows through the compared layers: every position of every sequence for charlm.
    rows = inputs.numel() if task.name == "charlm" else inputs.shape[0]
    assert task.tokens_per_batch == rows
    assert inputs.shape[0] == targets.shape[0] == task.batch_size


@pytest.mark.parametrize("kind", FACTORIES)
def test_training_reduces_loss(task: tasks.Task, kind: str) -> None:
    model = task.build(FACTORIES[kind], seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, targets = next(task.train_batches(0))
    initial = task.loss(model, inputs, targets).item()
    for _ in range(20):
        optimizer.zero_grad()
        loss = task.loss(model, inputs, targets)
        loss.backward()
        optimizer.step()
    assert loss.dim() == 0
    assert task.loss(model, inputs, targets).item() < 0.9 * initial


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluate_is_finite_and_restores_mode(task: tasks.Task, kind: str, split: str) -> None:
    model = task.build(FACTORIES[kind], seed=0)
    model.train()
    scores = task.evaluate(model, split)
    assert set(scores) == {"loss", task.metric}
    assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values())
    assert model.training
    model.eval()
    task.evaluate(model, split)
    assert not model.training


def test_evaluate_rejects_unknown_split(task: tasks.Task) -> None:
    with pytest.raises(ValueError, match="split"):
        task.evaluate(task.build(FACTORIES["dense"], 0), "train")


def test_batches_are_deterministic_per_seed(task: tasks.Task) -> None:
    again = first_batches(task, 7)
    for (x1, y1), (x2, y2) in zip(first_batches(task, 7), again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = first_batches(task, 8)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(again, other))


@pytest.mark.parametrize("kind", FACTORIES)
def test_build_and_evaluate_are_deterministic_per_seed(task: tasks.Task, kind: str) -> None:
    first, second = (task.build(FACTORIES[kind], seed=3) for _ in range(2))
    for p1, p2 in zip(first.parameters(), second.parameters()):
        assert torch.equal(p1, p2)
    assert task.evaluate(first, "test") == task.evaluate(second, "test")
    # A fresh task object rebuilds the same held-out data.
    assert make_task(task.name, "tiny").evaluate(first, "test") == task.evaluate(first, "test")
    other = task.build(FACTORIES[kind], seed=4)
    assert task.evaluate(other, "test")["loss"] != task.evaluate(first, "test")["loss"]


def test_build_leaves_global_rng_alone(task: tasks.Task) -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    task.build(FACTORIES["dense"], seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_compared_layers_come_from_the_factory(task: tasks.Task) -> None:
    made: list = []

    def counting(i: int, o: int, b: bool) -> nn.Module:
        made.append(nanomoe.NanoMoELinear(i, o, rank=2, num_blocks=2, bias=b))
        return made[-1]

    model = task.build(counting, seed=0)
    assert len(made) == COMPARED[task.name]
    in_model = [m for m in model.modules() if isinstance(m, nanomoe.NanoMoELinear)]
    assert [id(m) for m in in_model] == [id(m) for m in made]
    plain = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(plain) == PLAIN[task.name]
    inputs, targets = next(task.train_batches(0))
    task.loss(model, inputs, targets).backward()
    assert all(p.grad is not None for m in made for p in m.parameters())


def test_make_task_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="task"):
        make_task("mnist", "tiny")
    with pytest.raises(ValueError, match="size"):
        make_task("digits", "huge")


def test_every_size_is_defined() -> None:
    for table in (tasks.CHARLM_SIZES, tasks.DIGITS_SIZES, tasks.TEACHER_SIZES):
        assert set(table) == set(tasks.SIZES)


def test_charlm_corpus_and_splits() -> None:
    task = make_task("charlm", "tiny")
    corpus = tasks.stdlib_corpus(task.config.chars)
    assert len(corpus) == task.config.chars
    assert 0 <= int(corpus.min()) and int(corpus.max()) < tasks.VOCAB
    assert len(torch.unique(corpus)) > 50  # real source text, not padding
    inputs, targets = task.splits["val"]
    assert inputs.shape == (task.config.eval_windows, task.config.context)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next character
    assert not torch.equal(task.splits["val"][0], task.splits["test"][0])


def test_digits_split_is_disjoint_stratified_and_standardized() -> None:
    data = tasks.digits_splits()
    sizes = {split: len(y) for split, (_, y) in data.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["train"] > sizes["val"] > 0 and sizes["test"] > 0
    rows = {split: {tuple(r.tolist()) for r in x} for split, (x, _) in data.items()}
    assert not rows["val"] & rows["test"]
    for _, labels in data.values():
        assert set(labels.tolist()) == set(range(10))
    x_train = data["train"][0]
    assert x_train.mean(0).abs().max() < 1e-4
    assert x_train.std(0).max() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name,decay", [("teacher", 1.0), ("teacher-flat", 0.0)])
def test_teacher_spectrum_and_noiseless_held_out(name: str, decay: float) -> None:
    task = make_task(name, "tiny")
    assert task.name == name and task.config.decay == decay
    singular = torch.linalg.svdvals(task.first)
    ranks = torch.arange(1, len(singular) + 1, dtype=torch.float32)
    expected = singular[0] * ranks**-task.config.decay
    assert torch.allclose(singular, expected, rtol=1e-4)
    assert singular.square().sum().item() == pytest.approx(task.config.hidden, rel=1e-4)
    x, y = task.splits["test"]
    assert torch.equal(task.teacher(x), y)
    # The teacher is a function of the task, not of the student's seed.
    assert torch.equal(make_task(name, "tiny").first, task.first)


class Constant(nn.Module):
    """Predicts the same output for every input row."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.expand(x.shape[0], -1)


def test_metrics_agree_with_their_definitions() -> None:
    charlm = make_task("charlm", "tiny")
    scores = charlm.evaluate(charlm.build(FACTORIES["dense"], 0), "val")
    assert scores["bpc"] == pytest.approx(scores["loss"] / math.log(2))
    teacher = make_task("teacher", "tiny")
    y = teacher.splits["test"][1]
    assert teacher.evaluate(Constant(y.mean(0)), "test")["nmse"] == pytest.approx(1.0, abs=1e-5)
    assert teacher.evaluate(Constant(y.mean(0) + 1), "test")["nmse"] > 1.5
    digits = make_task("digits", "tiny")
    labels = digits.data["test"][1]
    majority = int(torch.bincount(labels).argmax())
    logits = torch.nn.functional.one_hot(torch.tensor(majority), 10).float()
    accuracy = digits.evaluate(Constant(logits), "test")["accuracy"]
    assert accuracy == pytest.approx((labels == majority).float().mean().item())
