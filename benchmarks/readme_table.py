"""The README's CPU speed table, in Markdown, from a speed.py result file.

Each variant cell: the kernel's forward / forward+backward time as a multiple of low-rank's, then
the reference's forward multiple. The full gate does K^2 r^2 more multiply-adds per token, so its
cell gives its forward arithmetic rate beside low-rank's. A second table gives the peak memory
of forward+backward, kernel against reference, and a third the floor of each size: the scalar
variant's multiply-adds over the best GEMM rate ``nn.Linear`` reached in that dtype in the same
run (at a throughput size: its one-token calls are bound by the weights' bytes), or its bytes
(x, y, weights) over the machine's copy bandwidth, whichever is longer (benchmarks/NOTES.md).

A result file of ``speed.py --suite blocks`` gets its own two tables instead: per variant, the
kernel's forward / forward+backward time as a multiple of the LowRankLinear of the same parameter
count (and of the same rank, in brackets); then the kernel's forward multiply-adds as a multiple of
that LowRankLinear's, and its forward arithmetic rate as a fraction of that LowRankLinear's: how
much of a time ratio is more work, and how much is slower work. A variant whose gate costs more
than dense has no cell.

    python benchmarks/readme_table.py benchmarks/results/speed-cpu.json
    python benchmarks/readme_table.py benchmarks/results/speed-cpu-blocks-amx.json
"""

import argparse
import json
from pathlib import Path
from typing import Callable

ELEMENTWISE = ("scalar", "diagonal", "diagonal_outer")


def _by_layer(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    table: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        table.setdefault((row["size"], row["dtype"]), {})[row["layer"]] = row
    return table


def _times(kernel: dict, reference: dict) -> str:
    return (
        f"{kernel['forward_vs_lowrank']:.2f} / {kernel['forward_backward_vs_lowrank']:.2f}"
        f" (ref {reference['forward_vs_lowrank']:.2f})"
    )


def _full(kernel: dict, lowrank: dict) -> str:
    mine, theirs = kernel["forward_tflop_per_s"] * 1e3, lowrank["forward_tflop_per_s"] * 1e3
    return (
        f"{mine:.0f} vs {theirs:.0f} ({100 * mine / theirs:.0f}%);"
        f" fwd+bwd {kernel['forward_backward_vs_lowrank']:.2f}"
    )


def speed_table(rows: list[dict]) -> str:
    lines = [
        "| size (B x in x out x rank x K) | dtype | low-rank fwd ms | scalar | diagonal"
        " | diagonal_outer | full (GFLOP/s vs low-rank's) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (size, dtype), layers in _by_layer(rows).items():
        lowrank = layers["LowRankLinear"]
        cells = [size, dtype, f"{lowrank['forward_ms']:.3f}"]
        for mixing in ELEMENTWISE:
            cells.append(_times(layers[f"nanomoe {mixing}"], layers[f"reference {mixing}"]))
        cells.append(_full(layers["nanomoe full"], lowrank))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    mixings = (*ELEMENTWISE, "full")
    lines = [
        "| size | dtype | " + " | ".join(mixings) + " |",
        "| --- | --- |" + " --- |" * len(mixings),
    ]
    for (size, dtype), layers in _by_layer(rows).items():
        cells = [size, dtype]
        for mixing in mixings:
            kernel, reference = layers[f"nanomoe {mixing}"], layers[f"reference {mixing}"]
            cells.append(
                f"{kernel['peak_memory_mib']:.0f} vs {reference['peak_memory_mib']:.0f} MiB"
                f" ({kernel['peak_memory_vs_reference']:.2f})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def floors_table(rows: list[dict], copy_gb_per_s: float) -> str:
    lines = [
        "| size | dtype | GEMM rate (nn.Linear's best) | multiply-adds / rate"
        " | bytes / copy bandwidth | floor | low-rank | kernel (scalar) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rates: dict[str, float] = {}
    for row in rows:
        if row["layer"] == "nn.Linear":
            rate = row["forward_tflop_per_s"] * 1e12
            rates[row["dtype"]] = max(rates.get(row["dtype"], 0.0), rate)
    for (size, dtype), layers in _by_layer(rows).items():
        kernel, rate = layers["nanomoe scalar"], rates[dtype]
        compute_ms = kernel["forward_flops"] / rate * 1e3
        memory_ms = kernel["forward_bytes"] / (copy_gb_per_s * 1e9) * 1e3
        cells = [
            size,
            dtype,
            f"{rate / 1e9:.0f} GFLOP/s",
            f"{compute_ms:.3f} ms",
            f"{memory_ms:.3f} ms",
            f"{max(compute_ms, memory_ms):.3f} ms",
            f"{layers['LowRankLinear']['forward_ms']:.3f} ms",
            f"{kernel['forward_ms']:.3f} ms",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _equal_params(kernel: dict, twin: dict) -> str:
    same_params = (kernel["forward_vs_same_params"], kernel["forward_backward_vs_same_params"])
    same_rank = (kernel["forward_vs_lowrank"], kernel["forward_backward_vs_lowrank"])
    return "{:.2f} / {:.2f} ({:.2f} / {:.2f})".format(*same_params, *same_rank)


def _work_and_rate(kernel: dict, twin: dict) -> str:
    work = kernel["forward_flops"] / twin["forward_flops"]
    rate = kernel["forward_tflop_per_s"] / twin["forward_tflop_per_s"]
    return f"{work:.2f}x, {100 * rate:.0f}%"


def blocks_table(rows: list[dict], cell: Callable[[dict, dict], str]) -> str:
    """One row per size and dtype, one cell per variant: cell(kernel, its equal-parameter
    LowRankLinear), or ``-`` where the variant was not timed (its gate costs more than dense)."""
    mixings = (*ELEMENTWISE, "full")
    lines = [
        "| size (B x in x out x rank x K) | dtype | " + " | ".join(mixings) + " |",
        "| --- | --- |" + " --- |" * len(mixings),
    ]
    for (size, dtype), layers in _by_layer(rows).items():
        cells = [size, dtype]
        for mixing in mixings:
            kernel = layers.get(f"nanomoe {mixing}")
            twin = layers.get(f"LowRankLinear = {mixing}")
            cells.append("-" if kernel is None or twin is None else cell(kernel, twin))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    results = json.loads(parser.parse_args().results.read_text())
    rows = results["rows"]
    if any(row.get("forward_vs_same_params") is not None for row in rows):  # older files lack it
        print(blocks_table(rows, _equal_params))
        print()
        print(blocks_table(rows, _work_and_rate))
        return
    print(speed_table(rows))
    print()
    print(memory_table(rows))
    print()
    print(floors_table(rows, results["machine"]["copy_gb_per_s"]))


if __name__ == "__main__":
    main()
