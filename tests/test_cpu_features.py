"""Which CPU kernels run (torch.ops.nanomoe.cpu_features), and the bfloat16 kernels' tests once
more on the AVX-512 register tile where AMX would otherwise take them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanomoe  # noqa: F401  (registers torch.ops.nanomoe)

FEATURES = torch.ops.nanomoe.cpu_features


def cpu_flags() -> set[str]:
    """The flags Linux reports for this CPU (empty elsewhere)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return set()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_features_follow_the_cpu() -> None:
    features = FEATURES()
    flags = cpu_flags()
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    assert ("avx512" in features) == avx512, (features, sorted(flags))
    assert ("avx512_bf16" in features) == (avx512 and "avx512_bf16" in flags)
    amx = {"amx_tile", "amx_bf16"} <= flags and os.environ.get("NANOMOE_AMX") != "0"
    # A CPU with AMX whose kernel grants this process the tile state: the bfloat16 products run on
    # AMX (a refusal, e.g. a too small signal stack, would silently leave them on AVX-512).
    assert ("amx_bf16" in features) == (amx and "avx512_bf16" in features), features


# The bfloat16 kernel tests of the forward and the backward, which on an AMX machine ran on AMX.
KERNEL_TESTS = [
    "tests/test_forward.py::test_kernel_tile_edges",
    "tests/test_forward.py::test_many_blocks_small_ranks",
    "tests/test_forward.py::test_down_projection_by_dot_products",
    "tests/test_forward.py::test_gate_on_amx",
    "tests/test_forward.py::test_bitwise_same_for_one_and_two_threads",
    "tests/test_backward.py::test_kernel_tile_edges",
    "tests/test_backward.py::test_many_blocks_small_ranks",
    "tests/test_backward.py::test_gate_tiles",
    "tests/test_backward.py::test_gate_gradients_add_up_over_tiles",
    "tests/test_backward.py::test_diagonal_outer_as_dense_matrix",
    "tests/test_stress.py::test_bitwise_same_for_any_thread_count",
]


@pytest.mark.skipif("amx_bf16" not in FEATURES(), reason="no AMX: the other tests ran AVX-512")
def test_bfloat16_kernels_without_amx() -> None:
    root = Path(__file__).resolve().parent.parent
    check = "import torch, nanomoe; assert 'amx_bf16' not in torch.ops.nanomoe.cpu_features()"
    env = {**os.environ, "NANOMOE_AMX": "0"}
    subprocess.run([sys.executable, "-c", check], env=env, check=True)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-k", "bfloat16", *KERNEL_TESTS]
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
