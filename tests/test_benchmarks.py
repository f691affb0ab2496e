"""The benchmark script runs end to end (on tiny sizes on the CPU; timings are not asserted)."""

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """One run of benchmarks/speed.py at 5 tokens, 12 in, 8 out, rank 2, K 2: stdout and JSON."""
    tmp_path = tmp_path_factory.mktemp("speed")
    out = tmp_path / "speed.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu"]
    command += ["--sizes", "5x12x8x2x2", "--repeats", "1", "--budget", "0", "--copy-mib", "1"]
    command += ["--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(out.read_text())


def test_speed_script_runs(speed_run) -> None:
    stdout, report = speed_run
    assert report["machine"]["device"] == "cpu"
    assert report["machine"]["copy_gb_per_s"] > 0
    rows = report["rows"]
    layers = {row["layer"] for row in rows}
    assert {"nn.Linear", "LowRankLinear", "nanomoe full", "reference scalar"} <= layers
    assert {row["dtype"] for row in rows} == {"float32", "bfloat16"}
    assert all(row["skipped"] is None for row in rows)
    for field in ("forward_ms", "forward_backward_ms", "forward_bytes", "forward_flops"):
        assert all(row[field] > 0 for row in rows), field
    for field in ("forward_gb_per_s", "forward_copy_fraction", "forward_tflop_per_s"):
        assert all(row[field] > 0 for row in rows), field
    assert "GB/s" in stdout and "GFLOP/s" in stdout
    assert all(row["forward_faults"] >= 0 and row["forward_backward_faults"] >= 0 for row in rows)
    if platform.libc_ver()[0] == "glibc" and not os.environ.get("LD_PRELOAD"):
        assert report["machine"]["heap"].startswith("glibc: no trimming, mmap from")


# Three 15 MiB buffers written and freed, round after round, after one of 20 MiB: on the heap
# steady_heap keeps, a round reuses the last one's pages. glibc's own thresholds follow the largest
# mapping freed (20 MiB: larger requests mapped on their own, and the heap trimmed whenever 40 MiB
# at its top are free), so every round's 45 MiB is handed back and faults afresh in the next.
REUSE = """
import sys
sys.path.insert(0, sys.argv[1])
from heap import minor_faults, steady_heap
if sys.argv[2] == "steady":
    steady_heap()
page = int(sys.argv[3])
def written(size):
    buffer = bytearray(size)
    buffer[::page] = bytes(size // page)  # a write to every page (calloc may skip fresh ones)
    return buffer
written(20 << 20)
for _ in range(3):
    before = minor_faults()
    buffers = [written(15 << 20) for _ in range(3)]
    after = minor_faults()
    del buffers
print(after - before)
"""


def glibc_defaults_in_force() -> bool:
    """Whether glibc's own heap, at its default thresholds and on small pages, serves this host's
    processes (no preloaded allocator, no tunables, transparent huge pages not always on)."""
    if os.environ.get("LD_PRELOAD") or os.environ.get("GLIBC_TUNABLES"):
        return False
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return not (thp.exists() and "[always]" in thp.read_text())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_steady_heap_keeps_freed_memory() -> None:
    def faults_of_last_round(heap: str) -> int:
        page = str(resource.getpagesize())
        command = [sys.executable, "-c", REUSE, str(ROOT / "benchmarks"), heap, page]
        return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    pages = 3 * (15 << 20) // resource.getpagesize()
    assert faults_of_last_round("steady") < pages // 100
    if glibc_defaults_in_force():  # the case steady_heap exists for: every round faults afresh
        assert faults_of_last_round("glibc") > pages // 2


def test_speed_counts_bytes_and_flops(speed_run) -> None:
    """The forward's bytes (x, y, parameters) and FLOPs follow from the size and the dtype."""
    rows = {row["layer"]: row for row in speed_run[1]["rows"] if row["dtype"] == "float32"}
    io = 5 * (12 + 8)
    assert rows["nn.Linear"]["forward_bytes"] == 4 * (io + 12 * 8 + 8)
    assert rows["nn.Linear"]["forward_flops"] == 2 * 5 * 12 * 8
    assert rows["LowRankLinear"]["forward_bytes"] == 4 * (io + 2 * (12 + 8) + 8)
    assert rows["LowRankLinear"]["forward_vs_lowrank"] == 1.0
    # scalar: down + up + a (2, 2) gate + bias; K_out K_in r extra multiply-adds per token
    assert rows["nanomoe scalar"]["forward_bytes"] == 4 * (io + 2 * (12 + 8) + 2 * 2 + 8)
    assert rows["nanomoe scalar"]["forward_flops"] == 2 * 5 * (2 * (12 + 8) + 2 * 2 * 2)
    assert rows["reference full"]["forward_bytes"] == rows["nanomoe full"]["forward_bytes"]
    bfloat16 = {r["layer"]: r for r in speed_run[1]["rows"] if r["dtype"] == "bfloat16"}
    assert 2 * bfloat16["nanomoe full"]["forward_bytes"] == rows["nanomoe full"]["forward_bytes"]


def test_peak_memory_is_measured_on_the_cpu(speed_run) -> None:
    rows = {(r["layer"], r["dtype"]): r for r in speed_run[1]["rows"]}
    for dtype in ("float32", "bfloat16"):
        # The reference keeps its intermediates for the backward: never nothing.
        assert rows[("reference scalar", dtype)]["peak_memory_mib"] > 0
        assert rows[("reference scalar", dtype)]["peak_memory_vs_reference"] == 1.0
        assert rows[("nanomoe full", dtype)]["peak_memory_vs_reference"] > 0


def test_readme_table_renders_every_size_and_variant(speed_run, tmp_path: Path) -> None:
    results = tmp_path / "speed.json"
    results.write_text(json.dumps(speed_run[1]))
    command = [sys.executable, str(ROOT / "benchmarks" / "readme_table.py"), str(results)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("| 5x12x8x2x2")]
    # float32 and bfloat16, in the speed, memory and floors tables
    assert [line.count("|") for line in lines] == [8, 8, 7, 7, 9, 9]


def test_blocks_suite_times_low_rank_at_each_variants_parameters(tmp_path: Path) -> None:
    """--suite blocks adds, per variant, a LowRankLinear of its parameter count and the ratio to it;
    a variant costing more than dense (here full, whose gate is K^2 r^2) is left out."""
    out = tmp_path / "blocks.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu"]
    command += ["--suite", "blocks", "--sizes", "3x16x16x2x8", "--dtypes", "float32"]
    command += ["--repeats", "1", "--budget", "0", "--copy-mib", "1", "--out", str(out)]
    command += ["--heap", "glibc"]  # glibc's own thresholds: nothing set, and the JSON says so
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["machine"]["heap"] == "unchanged"
    rows = {row["layer"]: row for row in report["rows"]}
    # scalar: 2 * 2 * 16 + 8 * 8 = 128 parameters besides the bias, as low-rank's rank 4
    assert rows["LowRankLinear = scalar"]["forward_flops"] == 2 * 3 * 4 * (16 + 16)
    assert "nanomoe full" not in rows and "LowRankLinear = full" not in rows
    for mixing in ("scalar", "diagonal"):
        kernel, twin = rows[f"nanomoe {mixing}"], rows[f"LowRankLinear = {mixing}"]
        ratio = kernel["forward_ms"] / twin["forward_ms"]
        assert kernel["forward_vs_same_params"] == pytest.approx(ratio)
        assert kernel["forward_backward_vs_same_params"] > 0
    assert rows["nanomoe scalar"]["forward_vs_lowrank"] > 0
    command = [sys.executable, str(ROOT / "benchmarks" / "readme_table.py"), str(out)]
    table = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    times, work = [line for line in table.splitlines() if line.startswith("| 3x16x16x2x8")]
    for line in (times, work):
        assert line.count("|") == 7 and line.endswith("| - | - |")  # outer and full over dense
    # the second table: multiply-adds as a multiple of the twin's, then the arithmetic rate
    kernel, twin = rows["nanomoe scalar"], rows["LowRankLinear = scalar"]
    rate = kernel["forward_tflop_per_s"] / twin["forward_tflop_per_s"]
    scalar_cell = work.split(" | ")[2]
    assert (
        scalar_cell == f"{kernel['forward_flops'] / twin['forward_flops']:.2f}x, {100 * rate:.0f}%"
    )


def test_fit_speed_script_runs(tmp_path: Path) -> None:
    out = tmp_path / "fit.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "fit_speed.py"), "--size", "64"]
    command += ["--blocks", "4", "--mixings", "scalar", "full", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(row["weight"], row["mixing"]) for row in rows] == [
        (weight, mixing) for weight in ("gaussian", "decaying") for mixing in ("scalar", "full")
    ]
    for row in rows:
        # 1/8 of 64 x 64 plus bias is 520: 128 r + 16 (+ 16 r^2 for full) + 64 bias
        assert row["rank"] == {"scalar": 3, "full": 2}[row["mixing"]]
        assert 0 < row["fit_error"] <= row["svd_error"] < 1
        assert row["start_s"] > 0 and row["fit_s"] > 0 and row["iterations"] >= 1
    assert "fit/SVD" in result.stdout
