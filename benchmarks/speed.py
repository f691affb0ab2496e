"""Forward and forward+backward speed of NanoMoE on the CPU or CUDA, beside its baselines.

For each size and dtype, one run times: ``nn.Linear`` (dense), ``LowRankLinear`` at the same rank
(two BLAS or cuBLAS matmuls), and, for every mixing variant, the pure-PyTorch reference and the
compiled kernel. The forward is timed under ``torch.no_grad()`` (the inference path);
forward+backward computes the gradients of the input and of every parameter. Every time is also
printed as a ratio to low-rank measured in the same run: ratios taken side by side are what carry
over between machines.

Each row also says what the forward moves and computes: its bytes (x read, y written, parameters
read, in the dtype), the bandwidth that makes, also as a fraction of the measured copy bandwidth
(``dst.copy_(src)``, read + write: the ceiling of a kernel that streams its data once), and its
arithmetic rate (2 * multiply-adds per token * tokens / time, counted by ``nanomoe.budget``). It
also gives the peak memory forward+backward allocates beyond its inputs and parameters, and its
ratio to the reference (on the CPU: what PyTorch's allocator hands out, seen by the profiler).
float32 runs with TF32 off, so every layer computes in full float32.

The ``blocks`` suite times large block counts at small ranks (``K`` 32 and 64, ``r`` 4 to 32), where
the mixing does as many multiply-adds as the projections or more. Each NanoMoE variant there also
gets a ``LowRankLinear`` of the same parameter count (the largest rank within it), and its times as
a ratio to that one: the comparison a user choosing between the two at one budget makes.

    python benchmarks/speed.py                       # the default device, its sizes and dtypes
    python benchmarks/speed.py --suite blocks        # large K, small r (speed-DEVICE-blocks.json)
    python benchmarks/speed.py --device cpu --sizes 4096x1024x1024x64x8 --dtypes float32
"""

import argparse
import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from heap import steady_heap
from plot import plot_rows
from report import Row, describe, machine_info, print_table
from timing import (
    copy_gb_per_s,
    cpu_peak_extra_mib,
    cuda_peak_extra_mib,
    interleaved_medians,
    median_ms,
)
from torch import Tensor, nn
from tqdm import tqdm

import nanomoe
from nanomoe.budget import (
    MIXINGS,
    dense_macs,
    dense_params,
    lowrank_macs,
    lowrank_params,
    lowrank_rank_for_budget,
    nanomoe_macs,
    nanomoe_params,
)
from nanomoe.reference import nanomoe_linear_reference

# tokens x in_features x out_features x rank x blocks, per suite and device. targets: CPU, two
# throughput and two latency sizes; CUDA, the target size first (H100, bfloat16), three more
# throughput sizes, one latency size. blocks: K = 32 and 64 at ranks 4 to 32, in = out = 1024 and
# 4096.
TARGET_SIZES = {
    "cpu": (
        "4096x1024x1024x64x8",
        "8192x2048x2048x128x8",
        "1x4096x4096x256x8",
        "16x4096x4096x256x8",
    ),
    "cuda": (
        "65536x4096x4096x128x8",
        "16384x4096x4096x128x8",
        "65536x1024x1024x64x8",
        "8192x4096x4096x256x8",
        "1x4096x4096x256x8",
    ),
}
BLOCK_SIZES = {
    "cpu": (
        "4096x1024x1024x4x64",
        "4096x1024x1024x16x64",
        "4096x1024x1024x8x32",
        "4096x1024x1024x32x32",
        "1024x4096x4096x4x64",
        "1024x4096x4096x32x64",
        "1024x4096x4096x8x32",
    ),
    "cuda": (
        "65536x1024x1024x4x64",
        "65536x1024x1024x16x64",
        "65536x1024x1024x32x32",
        "16384x4096x4096x8x64",
        "16384x4096x4096x32x64",
        "16384x4096x4096x8x32",
    ),
}
SUITES = {"targets": TARGET_SIZES, "blocks": BLOCK_SIZES}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("bfloat16", "float16", "float32")}
COPY_MIB = {"cpu": 256, "cuda": 1024}


class Shape(NamedTuple):
    tokens: int
    in_features: int
    out_features: int
    rank: int
    blocks: int


@dataclass
class Layer:
    name: str
    module: nn.Module
    forward: Callable[[Tensor], Tensor]
    params: int  # parameter count, from nanomoe.budget
    macs: int  # multiply-adds per token, from nanomoe.budget


@dataclass(frozen=True)
class Setup:
    device: torch.device
    repeats: int
    budget_s: float
    copy_gb_per_s: float


def reference_name(mixing: str) -> str:
    return f"reference {mixing}"


def kernel_name(mixing: str) -> str:
    return f"nanomoe {mixing}"


def same_params_name(mixing: str) -> str:
    return f"LowRankLinear = {mixing}"


def _reference(layer: nanomoe.NanoMoELinear, x: Tensor) -> Tensor:
    gate = (layer.mix_left, layer.mix_right)
    return nanomoe_linear_reference(x, layer.down, layer.mix, layer.up, layer.bias, *gate)


def layers_for(
    shape: Shape, dtype: torch.dtype, device: torch.device, same_params: bool
) -> list[Layer]:
    """The baselines, then per mixing the reference and the kernel; with ``same_params``, also a
    LowRankLinear of each variant's parameter count, and no variant costing more than dense."""
    n, m, rank, blocks = shape.in_features, shape.out_features, shape.rank, shape.blocks
    factory = {"dtype": dtype, "device": device}
    dense = nn.Linear(n, m, **factory)
    lowrank = nanomoe.LowRankLinear(n, m, rank, **factory)
    layers = [
        Layer("nn.Linear", dense, dense, dense_params(n, m), dense_macs(n, m)),
        Layer(
            "LowRankLinear", lowrank, lowrank, lowrank_params(n, m, rank), lowrank_macs(n, m, rank)
        ),
    ]
    for mixing in MIXINGS:
        layer = nanomoe.NanoMoELinear(n, m, rank, blocks, mixing, **factory)
        params = nanomoe_params(n, m, rank, blocks, mixing)
        macs = nanomoe_macs(n, m, rank, blocks, mixing)
        if same_params:
            if params > dense_params(n, m):
                continue
            equal = lowrank_rank_for_budget(n, m, params)
            twin = nanomoe.LowRankLinear(n, m, equal, **factory)
            cost = (lowrank_params(n, m, equal), lowrank_macs(n, m, equal))
            layers.append(Layer(same_params_name(mixing), twin, twin, *cost))
        layers.append(
            Layer(reference_name(mixing), layer, partial(_reference, layer), params, macs)
        )
        layers.append(Layer(kernel_name(mixing), layer, layer, params, macs))
    return layers


def layer_calls(
    layer: Layer, x: Tensor, grad_out: Tensor
) -> tuple[Callable[[], object], Callable[[], object]]:
    """The two timed calls: the forward without autograd, and forward+backward to every input."""
    inputs = [x, *layer.module.parameters()]

    def forward() -> None:
        with torch.no_grad():
            layer.forward(x)

    def forward_backward() -> None:
        torch.autograd.grad(layer.forward(x), inputs, grad_out)

    return forward, forward_backward


def measure_layer(layer: Layer, x: Tensor, grad_out: Tensor, row: Row, setup: Setup) -> None:
    """Fill in row's times (and peak memory on CUDA); a call that cannot run marks it skipped."""
    forward, forward_backward = layer_calls(layer, x, grad_out)
    try:
        row.forward_ms = median_ms(setup.device, forward, setup.repeats, setup.budget_s)
        row.forward_backward_ms = median_ms(
            setup.device, forward_backward, setup.repeats, setup.budget_s
        )
        if setup.device.type == "cuda":
            row.peak_memory_mib = cuda_peak_extra_mib(forward_backward)
    except (torch.cuda.OutOfMemoryError, NotImplementedError) as error:
        first_line = (str(error).splitlines() or [""])[0]
        row.skipped = f"{type(error).__name__}: {first_line[:120]}"


def measure_interleaved(
    layers: list[Layer], x: Tensor, grad_out: Tensor, rows: list[Row], setup: Setup
) -> None:
    """CPU: the layers' forwards timed in rounds, one call of each per round, then their
    forward+backwards likewise, so that the machine's noise hits every layer alike; then each
    forward+backward's peak memory."""
    calls = [layer_calls(layer, x, grad_out) for layer in layers]
    forwards = interleaved_medians([c[0] for c in calls], setup.repeats, setup.budget_s)
    both = interleaved_medians([c[1] for c in calls], setup.repeats, setup.budget_s)
    for row, forward, forward_backward in zip(rows, forwards, both):
        row.forward_ms, row.forward_faults = forward
        row.forward_backward_ms, row.forward_backward_faults = forward_backward
    for row, call in zip(rows, calls):
        row.peak_memory_mib = cpu_peak_extra_mib(call[1])


def add_rates(row: Row, copy_gb_per_s: float) -> None:
    """The forward's bandwidth, its fraction of the copy bandwidth, and its arithmetic rate."""
    if row.forward_ms is None:
        return
    seconds = row.forward_ms * 1e-3
    row.forward_gb_per_s = row.forward_bytes / seconds / 1e9
    row.forward_copy_fraction = row.forward_gb_per_s / copy_gb_per_s
    row.forward_tflop_per_s = row.forward_flops / seconds / 1e12


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return None if value is None or not base else value / base


def add_ratios(rows: list[Row]) -> None:
    """Times as ratios to LowRankLinear; peak memory of reference and kernel to the reference."""
    by_layer = {row.layer: row for row in rows}
    lowrank = by_layer["LowRankLinear"]
    for row in rows:
        row.forward_vs_lowrank = _ratio(row.forward_ms, lowrank.forward_ms)
        row.forward_backward_vs_lowrank = _ratio(
            row.forward_backward_ms, lowrank.forward_backward_ms
        )
    for mixing in MIXINGS:
        if kernel_name(mixing) not in by_layer:  # over dense's parameters: not timed
            continue
        twin = by_layer.get(same_params_name(mixing))
        if twin is not None:
            for row in (by_layer[reference_name(mixing)], by_layer[kernel_name(mixing)]):
                row.forward_vs_same_params = _ratio(row.forward_ms, twin.forward_ms)
                row.forward_backward_vs_same_params = _ratio(
                    row.forward_backward_ms, twin.forward_backward_ms
                )
        reference = by_layer[reference_name(mixing)].peak_memory_mib
        for name in (reference_name(mixing), kernel_name(mixing)):
            row = by_layer[name]
            row.peak_memory_vs_reference = _ratio(row.peak_memory_mib, reference)


def measure_size(
    size: str, dtype_name: str, setup: Setup, same_params: bool, progress: tqdm
) -> list[Row]:
    """Every layer at one size and dtype, on the same input."""
    shape = Shape(*(int(v) for v in size.split("x")))
    dtype, device = DTYPES[dtype_name], setup.device
    x = torch.randn(shape.tokens, shape.in_features, dtype=dtype, device=device, requires_grad=True)
    grad_out = torch.ones(shape.tokens, shape.out_features, dtype=dtype, device=device)
    element = dtype.itemsize
    layers = layers_for(shape, dtype, device, same_params)
    rows = []
    for layer in layers:
        moved = (shape.tokens * (shape.in_features + shape.out_features) + layer.params) * element
        rows.append(Row(size, dtype_name, layer.name, moved, 2 * layer.macs * shape.tokens))
    if device.type == "cpu":
        progress.set_postfix_str(f"{size} {dtype_name}, all layers in rounds")
        measure_interleaved(layers, x, grad_out, rows, setup)
    else:
        for layer, row in zip(layers, rows):
            progress.set_postfix_str(f"{size} {dtype_name} {layer.name}")
            measure_layer(layer, x, grad_out, row, setup)
    progress.update()
    for row in rows:
        add_rates(row, setup.copy_gb_per_s)
    add_ratios(rows)
    return rows


def run(
    sizes: list[str],
    dtypes: list[str],
    setup: Setup,
    same_params: bool,
    save: Callable[[list[Row]], None],
) -> list[Row]:
    """Every size in every dtype; ``save`` gets the rows so far after each, so a run cut short
    (a time limit on a lent GPU) still leaves what it measured."""
    rows: list[Row] = []
    jobs = [(size, dtype) for size in sizes for dtype in dtypes]
    progress = tqdm(total=len(jobs), desc="timing", unit="size")
    for size, dtype_name in jobs:
        rows += measure_size(size, dtype_name, setup, same_params, progress)
        save(rows)
    progress.close()
    return rows


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return torch.device(choice)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--suite", choices=tuple(SUITES), default="targets", help="default sizes")
    parser.add_argument("--sizes", nargs="+", help="BxNxMxRxK (default: the suite's, per device)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: per device")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--copy-mib", type=int, help="copy bandwidth buffer (default: per device)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/speed-DEVICE.json")
    parser.add_argument(
        "--heap",
        choices=("steady", "glibc"),
        default="steady",
        help="CPU: keep freed memory (steady, default; see heap.py) or glibc's own thresholds",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    kind = device.type
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 in full precision for every layer
    heap = steady_heap() if kind == "cpu" and args.heap == "steady" else "unchanged"
    copy_mib = args.copy_mib or COPY_MIB[kind]
    bandwidth = copy_gb_per_s(device, copy_mib, args.repeats, args.budget)
    setup = Setup(device, args.repeats, args.budget, bandwidth)
    info = machine_info(device, args.threads, bandwidth, copy_mib, heap)
    print(describe(info))

    sizes = args.sizes or list(SUITES[args.suite][kind])
    blocks = args.suite == "blocks"
    suffix = "-blocks" if blocks else ""
    out = args.out or Path(f"benchmarks/results/speed-{kind}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[Row]) -> None:
        out.write_text(json.dumps({"machine": info, "rows": [asdict(r) for r in rows]}, indent=1))

    dtypes = args.dtypes or list(DEFAULT_DTYPES[kind])
    rows = run(sizes, dtypes, setup, same_params=blocks, save=save)
    print_table(rows, device)
    print(f"\nwrote {out} ({describe(info)})")
    try:
        plot_rows([asdict(r) for r in rows], out.with_suffix(".png"), describe(info))
        print(f"wrote {out.with_suffix('.png')}")
    except ModuleNotFoundError as error:  # matplotlib is optional
        print(f"no plot: {error.name} is not installed")


if __name__ == "__main__":
    main()
