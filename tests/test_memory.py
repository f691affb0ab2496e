"""Peak memory of the CPU kernels' forward+backward: never above the reference's (issue 8's
target), counted from the allocator's events as benchmarks/speed.py counts it (deterministic)."""

import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from support import Case, make_case

from nanomoe.budget import MIXINGS
from nanomoe.reference import nanomoe_linear_reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from timing import cpu_peak_extra_mib


def forward_backward(
    fn: Callable[..., torch.Tensor], case: Case, grad_out: torch.Tensor
) -> Callable[[], object]:
    """One forward+backward to every input, grad_out made beforehand (as speed.py does)."""
    inputs = [t.requires_grad_() for t in case.args() if t is not None]
    return lambda: torch.autograd.grad(fn(*case.args()), inputs, grad_out)


# Issue 8's sizes (tokens, features in = out, rank, K): the throughput size that runs the projected
# kernels, and the latency sizes, whose backward runs on ATen's products.
@pytest.mark.parametrize("size", [(4096, 1024, 64, 8), (16, 4096, 256, 8), (1, 4096, 256, 8)])
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_peak_memory_at_most_the_reference(
    size: tuple[int, int, int, int], mixing: str, dtype: torch.dtype
) -> None:
    tokens, features, rank, blocks = size
    block = features // blocks
    case = make_case((tokens,), blocks, blocks, block, block, rank, mixing, dtype)
    grad_out = torch.ones(tokens, features, dtype=dtype)
    kernel = forward_backward(torch.ops.nanomoe.linear, case, grad_out)
    reference = forward_backward(nanomoe_linear_reference, case, grad_out)
    # The kernel's scratch and float32 sums are per thread: 2 threads, as the suite measures.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kernel(), reference()  # warm: nothing allocated once per process is counted
        kernel_mib, reference_mib = cpu_peak_extra_mib(kernel), cpu_peak_extra_mib(reference)
    finally:
        torch.set_num_threads(previous)
    assert kernel_mib <= reference_mib, f"{kernel_mib:.3f} MiB against {reference_mib:.3f} MiB"
