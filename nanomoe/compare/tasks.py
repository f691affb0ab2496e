"""The training tasks of ``nanomoe compare``: each trains one model whose compared layers come from
a ``LinearFactory``, needs no download, and is deterministic for a fixed seed on CPU.

- ``charlm``: a small pre-LayerNorm GPT over characters of the Python standard library's own source
  (present on every machine with Python); metric bits per character.
- ``digits``: an MLP on scikit-learn's bundled 8x8 handwritten digits; metric accuracy.
- ``teacher``: a student MLP regressing a fixed random teacher MLP whose weights have a decaying
  singular-value spectrum, so that rank is what the compared layers must buy; metric normalized MSE.
- ``teacher-flat``: the same with a flat spectrum (every direction of the teacher matters as much),
  the regime where a layer's rank, not its parameter count, limits it.

Each has three sizes: ``tiny`` (tests), ``default`` (the tool's default run) and ``full``.

The data (corpus, split, teacher, held-out sets) is fixed and identical for every seed, so that
seeds vary only the model's initialization and the order of the training batches.
"""

import abc
import dataclasses
import functools
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanomoe.compare import LinearFactory

__all__ = ["SIZES", "TASKS", "CharLMTask", "DigitsTask", "Task", "TeacherTask", "make_task"]

TASKS = ("charlm", "digits", "teacher", "teacher-flat")
SIZES = ("tiny", "default", "full")
SPLITS = ("val", "test")

# Seeds of the fixed data (split, teacher, held-out inputs); distinct from any model seed's stream
# because each uses its own generator.
DATA_SEED = 1234


class Task(abc.ABC):
    """One training problem: a model built around a ``LinearFactory``, its data and its metric."""

    name: str
    metric: str
    higher_is_better: bool
    steps: int
    batch_size: int
    tokens_per_batch: int

    @abc.abstractmethod
    def make_model(self, linear: LinearFactory) -> nn.Module:
        """The model, its compared layers built with ``linear``; called under a seeded RNG."""

    @abc.abstractmethod
    def train_batches(self, seed: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """Endless ``(inputs, targets)`` training batches, the same sequence for the same seed."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        """The scalar training objective on one batch."""

    @abc.abstractmethod
    def held_out(self, split: str) -> Tuple[Tensor, Tensor]:
        """The fixed ``(inputs, targets)`` of ``split`` (``"val"`` or ``"test"``)."""

    @abc.abstractmethod
    def scores(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Dict[str, float]:
        """``{"loss": ..., self.metric: ...}`` on a held-out set."""

    def build(self, linear: LinearFactory, seed: int) -> nn.Module:
        """A fresh model whose parameters depend only on ``seed`` (the global RNG is left as is)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.make_model(linear)

    def evaluate(self, model: nn.Module, split: str) -> Dict[str, float]:
        """Held-out loss and metric, in eval mode without gradients; the model's mode is restored so
        that a runner may evaluate in the middle of training."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        inputs, targets = self.held_out(split)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self.scores(model, inputs, targets)
        finally:
            model.train(was_training)


# --- charlm ------------------------------------------------------------------------------------

# Characters are their code points below 128; anything else (rare in the stdlib) shares one id.
ASCII = 128
VOCAB = ASCII + 1


@dataclass(frozen=True)
class CharLMConfig:
    chars: int  # corpus length
    d_model: int
    layers: int
    heads: int
    context: int
    batch_size: int
    steps: int
    eval_windows: int  # per held-out split


CHARLM_SIZES = {
    "tiny": CharLMConfig(20_000, 32, 1, 2, 16, 4, 5, 8),
    "default": CharLMConfig(1_000_000, 128, 2, 4, 64, 8, 200, 64),
    "full": CharLMConfig(4_000_000, 256, 4, 8, 128, 32, 3000, 256),
}


def _stdlib_sources() -> Iterator[Path]:
    """The standard library's ``.py`` files in sorted order, without installed third-party code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = (p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    return iter(sorted(paths, key=lambda p: p.relative_to(root).as_posix()))


@functools.lru_cache(maxsize=4)
def stdlib_corpus(chars: int) -> Tensor:
    """The first ``chars`` characters of the concatenated stdlib sources, as int64 ids."""
    parts, total = [], 0
    for path in _stdlib_sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    if total < chars:
        raise RuntimeError(f"the standard library holds only {total} characters, {chars} wanted")
    text = "".join(parts)[:chars]
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    return codes.clamp_max(ASCII)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, linear: LinearFactory) -> None:
        super().__init__()
        self.heads = heads
        # Separate q/k/v projections rather than one fused (d, 3d) layer, so each compared layer is
        # square and sized like the others.
        self.q, self.k, self.v, self.out = (linear(d_model, d_model, True) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape

        def split_heads(t: Tensor) -> Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class GPTBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, linear: LinearFactory) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, linear)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            linear(d_model, 4 * d_model, True), nn.GELU(), linear(4 * d_model, d_model, True)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharGPT(nn.Module):
    """Pre-LayerNorm GPT; embeddings and the LM head are plain, everything else is compared."""

    def __init__(self, config: CharLMConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, config.d_model)
        self.positions = nn.Embedding(config.context, config.d_model)
        blocks = (GPTBlock(config.d_model, config.heads, linear) for _ in range(config.layers))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.blocks(self.tokens(ids) + self.positions(positions))
        return self.head(self.norm(x))


def _windows(data: Tensor, starts: Tensor, context: int) -> Tuple[Tensor, Tensor]:
    """Inputs ``data[s : s + context]`` and next-character targets for each start ``s``."""
    index = starts[:, None] + torch.arange(context + 1)
    rows = data[index]
    return rows[:, :-1], rows[:, 1:]


class CharLMTask(Task):
    name = "charlm"
    metric = "bpc"
    higher_is_better = False

    def __init__(self, config: CharLMConfig) -> None:
        self.config = config
        self.steps, self.batch_size = config.steps, config.batch_size
        self.tokens_per_batch = config.batch_size * config.context
        corpus = stdlib_corpus(config.chars)
        # Contiguous 90/5/5 ranges: held-out text is never seen, not even as overlapping context.
        train_end, val_end = int(0.9 * len(corpus)), int(0.95 * len(corpus))
        self.train_data = corpus[:train_end]
        self.splits = {
            "val": self._fixed_windows(corpus[train_end:val_end]),
            "test": self._fixed_windows(corpus[val_end:]),
        }

    def _fixed_windows(self, data: Tensor) -> Tuple[Tensor, Tensor]:
        """Evenly spaced windows over a held-out range: a fixed, cheap subset covering all of it."""
        last = len(data) - self.config.context - 1
        starts = torch.linspace(0, last, self.config.eval_windows).long()
        return _windows(data, starts, self.config.context)

    def make_model(self, linear: LinearFactory) -> nn.Module:
        return CharGPT(self.config, linear)

    def train_batches(self, seed: int) -> Iterator[Tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        high = len(self.train_data) - self.config.context - 1
        while True:
            starts = torch.randint(0, high, (self.batch_size,), generator=generator)
            yield _windows(self.train_data, starts, self.config.context)

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def held_out(self, split: str) -> Tuple[Tensor, Tensor]:
        return self.splits[split]

    def scores(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Dict[str, float]:
        loss = self.loss(model, inputs, targets).item()
        return {"loss": loss, "bpc": loss / math.log(2)}


# --- digits ------------------------------------------------------------------------------------

DIGIT_FEATURES, DIGIT_CLASSES = 64, 10


@dataclass(frozen=True)
class DigitsConfig:
    hidden: int
    batch_size: int
    steps: int


DIGITS_SIZES = {
    "tiny": DigitsConfig(32, 32, 5),
    "default": DigitsConfig(256, 64, 600),
    "full": DigitsConfig(512, 64, 3000),
}


@functools.lru_cache(maxsize=1)
def digits_splits() -> Dict[str, Tuple[Tensor, Tensor]]:
    """scikit-learn's digits split 60/20/20 per class by a fixed permutation, standardized with the
    training statistics."""
    from sklearn.datasets import load_digits  # optional dependency, needed only by this task

    features, labels = load_digits(return_X_y=True)
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(DATA_SEED)
    parts: Dict[str, list] = {"train": [], "val": [], "test": []}
    for label in range(DIGIT_CLASSES):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut1, cut2 = int(0.6 * len(members)), int(0.8 * len(members))
        parts["train"].append(members[:cut1])
        parts["val"].append(members[cut1:cut2])
        parts["test"].append(members[cut2:])
    index = {split: torch.cat(chunks).sort().values for split, chunks in parts.items()}
    mean, std = x[index["train"]].mean(0), x[index["train"]].std(0)
    # Border pixels are always blank in training; leave them at zero rather than divide by zero.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return {split: ((x[rows] - mean) / std, y[rows]) for split, rows in index.items()}


class DigitsTask(Task):
    """64 -> hidden -> hidden -> 10 with GELU. The two hidden layers are compared; the 10-way
    readout stays a plain ``nn.Linear`` because 10 outputs admit few block counts and it is tiny."""

    name = "digits"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, config: DigitsConfig) -> None:
        self.config = config
        self.steps, self.batch_size = config.steps, config.batch_size
        self.tokens_per_batch = config.batch_size
        self.data = digits_splits()

    def make_model(self, linear: LinearFactory) -> nn.Module:
        hidden = self.config.hidden
        return nn.Sequential(
            linear(DIGIT_FEATURES, hidden, True),
            nn.GELU(),
            linear(hidden, hidden, True),
            nn.GELU(),
            nn.Linear(hidden, DIGIT_CLASSES),
        )

    def train_batches(self, seed: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """Epochs of the training set, shuffled anew each epoch, a short last batch dropped."""
        x, y = self.data["train"]
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x) - self.batch_size + 1, self.batch_size):
                rows = order[start : start + self.batch_size]
                yield x[rows], y[rows]

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(model(inputs), targets)

    def held_out(self, split: str) -> Tuple[Tensor, Tensor]:
        return self.data[split]

    def scores(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Dict[str, float]:
        logits = model(inputs)
        accuracy = (logits.argmax(1) == targets).float().mean().item()
        return {"loss": F.cross_entropy(logits, targets).item(), "accuracy": accuracy}


# --- teacher -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherConfig:
    features: int  # input and output width
    hidden: int
    decay: float  # singular values s_k proportional to k ** -decay
    noise: float  # std of the noise on training targets, relative to the target std
    held_out: int  # examples per held-out split
    batch_size: int
    steps: int


TEACHER_SIZES = {
    "tiny": TeacherConfig(16, 32, 1.0, 0.05, 64, 16, 5),
    "default": TeacherConfig(128, 512, 1.0, 0.05, 2048, 64, 1000),
    "full": TeacherConfig(256, 1024, 1.0, 0.05, 8192, 128, 5000),
}


def spectral_matrix(rows: int, cols: int, decay: float, generator: torch.Generator) -> Tensor:
    """``U diag(s) V^T`` with random orthonormal ``U``, ``V`` and ``s_k ∝ k^-decay``, scaled so that
    a standard Gaussian input gives outputs of unit variance (``sum s_k^2 = rows``)."""
    rank = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=generator))
    s = torch.arange(1, rank + 1, dtype=torch.float32) ** -decay
    s = s * math.sqrt(rows / s.square().sum().item())
    return u @ torch.diag(s) @ v.T


class TeacherMLP(nn.Module):
    """The student's architecture: ``features -> hidden -> features`` with GELU."""

    def __init__(self, config: TeacherConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.first = linear(config.features, config.hidden, True)
        self.second = linear(config.hidden, config.features, True)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(F.gelu(self.first(x)))


class TeacherTask(Task):
    """Regress a fixed bias-free teacher of the same shape. Both teacher weights have a power-law
    spectrum, so a rank-``r`` layer misses the tail ``s_{r+1}, s_{r+2}, ...`` that higher-rank
    structured layers can fit. Held-out targets are noiseless: the metric measures the function
    learned, not the noise."""

    metric = "nmse"
    higher_is_better = False

    def __init__(self, config: TeacherConfig, name: str = "teacher") -> None:
        self.name = name
        self.config = config
        self.steps, self.batch_size = config.steps, config.batch_size
        self.tokens_per_batch = config.batch_size
        generator = torch.Generator().manual_seed(DATA_SEED)
        self.first = spectral_matrix(config.hidden, config.features, config.decay, generator)
        self.second = spectral_matrix(config.features, config.hidden, config.decay, generator)
        self.splits = {split: self._examples(config.held_out, generator) for split in SPLITS}
        self.target_std = self.splits["val"][1].std().item()

    def teacher(self, x: Tensor) -> Tensor:
        return F.gelu(x @ self.first.T) @ self.second.T

    def _examples(self, count: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        x = torch.randn(count, self.config.features, generator=generator)
        return x, self.teacher(x)

    def make_model(self, linear: LinearFactory) -> nn.Module:
        return TeacherMLP(self.config, linear)

    def train_batches(self, seed: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """Fresh Gaussian inputs every batch, so the student never overfits a finite sample."""
        generator = torch.Generator().manual_seed(seed)
        noise = self.config.noise * self.target_std
        while True:
            x, y = self._examples(self.batch_size, generator)
            yield x, y + noise * torch.randn(y.shape, generator=generator)

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(model(inputs), targets)

    def held_out(self, split: str) -> Tuple[Tensor, Tensor]:
        return self.splits[split]

    def scores(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Dict[str, float]:
        mse = self.loss(model, inputs, targets).item()
        # Fraction of variance unexplained: each output's variance about its own mean.
        variance = (targets - targets.mean(0)).square().mean().item()
        return {"loss": mse, "nmse": mse / variance}


# --- registry ----------------------------------------------------------------------------------


def make_task(name: str, size: str = "default") -> Task:
    """The task ``name`` (one of ``TASKS``) at ``size`` (one of ``SIZES``)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if name == "charlm":
        return CharLMTask(CHARLM_SIZES[size])
    if name == "digits":
        return DigitsTask(DIGITS_SIZES[size])
    if name == "teacher":
        return TeacherTask(TEACHER_SIZES[size])
    if name == "teacher-flat":
        return TeacherTask(dataclasses.replace(TEACHER_SIZES[size], decay=0.0), name)
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")
