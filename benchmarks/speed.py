"""Forward and forward+backward time of NanoMoE on the CPU, side by side with its baselines.

For each size and dtype, one run times: ``nn.Linear`` (dense), ``LowRankLinear`` at the same rank
(two BLAS matmuls), and, for every mixing variant, the pure-PyTorch reference and the compiled
kernel. Every time is also printed as a ratio to low-rank measured in the same run, because this
machine is shared and noisy: ratios taken side by side are what carry over.

    python benchmarks/speed.py                         # default sizes (see SIZES)
    python benchmarks/speed.py --sizes 4096x1024x1024x64x8 --dtypes float32
"""

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

import nanomoe
from nanomoe.budget import MIXINGS
from nanomoe.reference import nanomoe_linear_reference

# tokens x in_features x out_features x rank x blocks: two throughput sizes, two latency sizes.
SIZES = ("4096x1024x1024x64x8", "8192x2048x2048x128x8", "1x4096x4096x256x8", "16x4096x4096x256x8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Row:
    size: str
    dtype: str
    layer: str
    forward_ms: float
    forward_backward_ms: float
    forward_vs_lowrank: float = 0.0
    forward_backward_vs_lowrank: float = 0.0


def median_ms(fn: Callable[[], None], repeats: int, budget_s: float) -> float:
    """Median wall time of fn after one warm-up call, stopping early once budget_s is spent."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(times)


def time_layer(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    params: list[torch.Tensor],
    repeats: int,
    budget_s: float,
) -> tuple[float, float]:
    def forward_only() -> None:
        with torch.no_grad():
            forward(x)

    grad_out: Optional[torch.Tensor] = None

    def forward_backward() -> None:
        nonlocal grad_out
        out = forward(x)
        grad_out = torch.ones_like(out) if grad_out is None else grad_out
        torch.autograd.backward(out, grad_out, inputs=[x, *params])

    return median_ms(forward_only, repeats, budget_s), median_ms(
        forward_backward, repeats, budget_s
    )


def layers_for(
    in_features: int, out_features: int, rank: int, blocks: int, dtype: torch.dtype
) -> dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
    factory = {"dtype": dtype}
    dense = nn.Linear(in_features, out_features, **factory)
    lowrank = nanomoe.LowRankLinear(in_features, out_features, rank, **factory)
    layers = {"nn.Linear": (dense, dense), "LowRankLinear": (lowrank, lowrank)}
    for mixing in MIXINGS:
        layer = nanomoe.NanoMoELinear(in_features, out_features, rank, blocks, mixing, **factory)

        def reference(x: torch.Tensor, layer: nanomoe.NanoMoELinear = layer) -> torch.Tensor:
            gate = (layer.mix_left, layer.mix_right)
            return nanomoe_linear_reference(x, layer.down, layer.mix, layer.up, layer.bias, *gate)

        layers[f"reference {mixing}"] = (layer, reference)
        layers[f"nanomoe {mixing}"] = (layer, layer)
    return layers


def run(sizes: list[str], dtypes: list[str], repeats: int, budget_s: float) -> list[Row]:
    rows: list[Row] = []
    jobs = [(size, dtype) for size in sizes for dtype in dtypes]
    progress = tqdm(total=len(jobs) * (2 + 2 * len(MIXINGS)), desc="timing", unit="layer")
    for size, dtype_name in jobs:
        tokens, n, m, rank, blocks = (int(v) for v in size.split("x"))
        dtype = DTYPES[dtype_name]
        x = torch.randn(tokens, n, dtype=dtype, requires_grad=True)
        measured: list[Row] = []
        for name, (module, forward) in layers_for(n, m, rank, blocks, dtype).items():
            progress.set_postfix_str(f"{size} {dtype_name} {name}")
            params = list(module.parameters())
            fwd, fwd_bwd = time_layer(forward, x, params, repeats, budget_s)
            measured.append(Row(size, dtype_name, name, fwd, fwd_bwd))
            progress.update()
        lowrank = next(r for r in measured if r.layer == "LowRankLinear")
        for row in measured:
            row.forward_vs_lowrank = row.forward_ms / lowrank.forward_ms
            row.forward_backward_vs_lowrank = row.forward_backward_ms / lowrank.forward_backward_ms
        rows += measured
    progress.close()
    return rows


def print_table(rows: list[Row]) -> None:
    header = f"{'size (BxNxMxRxK)':<22}{'dtype':<10}{'layer':<26}{'fwd ms':>9}{'x lowrank':>10}"
    header += f"{'fwd+bwd ms':>12}{'x lowrank':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.size:<22}{r.dtype:<10}{r.layer:<26}{r.forward_ms:>9.3f}{r.forward_vs_lowrank:>10.2f}"
            f"{r.forward_backward_ms:>12.3f}{r.forward_backward_vs_lowrank:>10.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="BxNxMxRxK")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = run(args.sizes, args.dtypes, args.repeats, args.budget)
    print_table(rows)
    machine = {
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    print(
        f"\nwrote {args.out} ({machine['cpu']}, {args.threads} threads, torch {torch.__version__})"
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
