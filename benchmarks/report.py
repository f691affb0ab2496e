"""What benchmarks/speed.py reports: the rows (one per layer, size and dtype), the table printed
from them, and the description of the machine that heads the table and the JSON file."""

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch


@dataclass
class Row:
    size: str
    dtype: str
    layer: str
    forward_bytes: int  # x read + y written + parameters read
    forward_flops: int  # 2 * multiply-adds per token * tokens
    forward_ms: Optional[float] = None
    forward_backward_ms: Optional[float] = None
    forward_faults: Optional[int] = None  # CPU: page faults per call (median), see heap.py
    forward_backward_faults: Optional[int] = None
    forward_vs_lowrank: Optional[float] = None
    forward_backward_vs_lowrank: Optional[float] = None
    forward_vs_same_params: Optional[float] = None  # to LowRankLinear of the same parameter count
    forward_backward_vs_same_params: Optional[float] = None
    forward_gb_per_s: Optional[float] = None
    forward_copy_fraction: Optional[float] = None  # of the measured copy bandwidth
    forward_tflop_per_s: Optional[float] = None
    peak_memory_mib: Optional[float] = None  # forward+backward, beyond inputs and parameters
    peak_memory_vs_reference: Optional[float] = None
    skipped: Optional[str] = None  # why the times are missing (out of memory, no kernel)


class Column(NamedTuple):
    header: str
    width: int
    cell: Callable[[Row], str]


def _number(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(fraction: Optional[float]) -> str:
    return _number(None if fraction is None else 100 * fraction, ".0f")


def columns_for(device: torch.device) -> list[Column]:
    """The table's columns: arithmetic rate in TFLOP/s on CUDA, GFLOP/s on the CPU."""
    on_cuda = device.type == "cuda"
    flop_scale = 1.0 if on_cuda else 1e3

    def rate(row: Row) -> str:
        value = row.forward_tflop_per_s
        return _number(None if value is None else value * flop_scale, ".1f")

    # CPU: each call's page faults beside its times (see heap.py); CUDA has none to count.
    faults = [] if on_cuda else [Column("faults", 8, lambda r: _number(r.forward_faults, "d"))]
    faults_both = (
        [] if on_cuda else [Column("faults", 8, lambda r: _number(r.forward_backward_faults, "d"))]
    )
    columns = [
        Column("size (BxNxMxRxK)", -22, lambda r: r.size),
        Column("dtype", -10, lambda r: r.dtype),
        Column("layer", -26, lambda r: r.layer),
        Column("fwd ms", 9, lambda r: _number(r.forward_ms, ".3f")),
        Column("x lowrank", 10, lambda r: _number(r.forward_vs_lowrank, ".2f")),
        *faults,
        Column("GB/s", 8, lambda r: _number(r.forward_gb_per_s, ".0f")),
        Column("copy %", 8, lambda r: _percent(r.forward_copy_fraction)),
        Column("TFLOP/s" if on_cuda else "GFLOP/s", 9, rate),
        Column("fwd+bwd ms", 12, lambda r: _number(r.forward_backward_ms, ".3f")),
        Column("x lowrank", 10, lambda r: _number(r.forward_backward_vs_lowrank, ".2f")),
        *faults_both,
        Column("x =params", 10, lambda r: _number(r.forward_vs_same_params, ".2f")),
        Column("bwd =params", 12, lambda r: _number(r.forward_backward_vs_same_params, ".2f")),
        Column("peak MiB", 10, lambda r: _number(r.peak_memory_mib, ".0f")),
        Column("x ref", 7, lambda r: _number(r.peak_memory_vs_reference, ".2f")),
    ]
    return columns


def print_table(rows: list[Row], device: torch.device) -> None:
    """One line per row; the width's sign picks the alignment (negative: left)."""
    columns = columns_for(device)
    header = "".join(f"{c.header:{'<' if c.width < 0 else '>'}{abs(c.width)}}" for c in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = (f"{c.cell(row):{'<' if c.width < 0 else '>'}{abs(c.width)}}" for c in columns)
        print("".join(cells) + (f"  skipped: {row.skipped}" if row.skipped else ""))


def machine_info(
    device: torch.device, threads: int, copy_gb_per_s: float, copy_mib: int, heap: str = "unchanged"
) -> dict[str, object]:
    """What the JSON header records about the machine and the settings the rows depend on."""
    info: dict[str, object] = {
        "device": device.type,
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "threads": threads,
        "torch": torch.__version__,
        "copy_gb_per_s": copy_gb_per_s,
        "copy_mib": copy_mib,
        "timing": "cuda events" if device.type == "cuda" else "wall clock",
        "heap": heap,  # see heap.py
    }
    if device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32"] = matmul.allow_tf32
        info["bf16_reduced_precision_reduction"] = matmul.allow_bf16_reduced_precision_reduction
        info["fp16_reduced_precision_reduction"] = matmul.allow_fp16_reduced_precision_reduction
    return info


def describe(info: dict[str, object]) -> str:
    """One line naming the machine, for above the table."""
    if info["device"] == "cuda":
        where = f"{info['gpu']}, CUDA {info['cuda']}, float32 matmuls without TF32"
    else:
        where = f"{info['cpu']}, {info['threads']} threads, heap {info.get('heap', 'not recorded')}"
    copy = f"copy bandwidth {info['copy_gb_per_s']:.0f} GB/s ({info['copy_mib']} MiB, read + write)"
    return f"{where}, torch {info['torch']}; {copy}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
