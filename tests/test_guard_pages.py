"""No CPU kernel reads past its operands: each operand ends just before an unmapped page,
so a read beyond it faults. AddressSanitizer (make sanitize) does not see the AVX-512 masked loads
and the AMX tile loads that read the kernels' tails; this does, for forward and backward, on the
paths for a few tokens (weights read in place) and for many (packed, AMX blocks), at odd sizes.

The cases run in a child process (``python tests/test_guard_pages.py``), whose fault fails the test
instead of ending the test session.
"""

import ctypes
import itertools
import mmap
import subprocess
import sys

import torch
from torch import Tensor

import nanomoe
from nanomoe.budget import gate_shapes

PROT_NONE = 0
MIXINGS = ("scalar", "diagonal", "diagonal_outer", "full")
# (K_out, K_in, n_b, m_b, rank): AMX-sized rows and depths with tails, odd sizes everywhere; and
# products shallower than one AMX step, on tiles shaped to their depth, reading x's and grad_out's
# last rows at 48 tokens (the grouped down-projection 12 deep, grad_mixed 16).
SHAPES = [
    (2, 3, 40, 17, 16),
    (3, 2, 33, 35, 5),
    (1, 1, 64, 48, 32),
    (4, 4, 6, 3, 18),
    (2, 2, 6, 16, 16),
]
TOKENS = (1, 2, 5, 16, 17, 48, 50, 130)

_libc = ctypes.CDLL(None, use_errno=True)


def against_guard(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A random tensor whose last byte is the last one before an unmapped page."""
    count = 1
    for size in shape:
        count *= size
    nbytes = count * torch.tensor([], dtype=dtype).element_size()
    page = mmap.PAGESIZE
    total = (nbytes + page - 1) // page * page + page
    memory = mmap.mmap(-1, total)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    if _libc.mprotect(ctypes.c_void_p(address + total - page), page, PROT_NONE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = total - page - nbytes
    tensor = torch.frombuffer(memory, dtype=dtype, count=count, offset=offset).view(shape)
    tensor.copy_(torch.randn(shape, dtype=torch.float64))
    return tensor


def run_cases() -> int:
    """Every case, forward and backward; returns how many ran."""
    cases = 0
    dtypes = (torch.float32, torch.bfloat16)
    for dtype, mixing, shape, tokens in itertools.product(dtypes, MIXINGS, SHAPES, TOKENS):
        k_out, k_in, n_b, m_b, rank = shape
        gates = gate_shapes(mixing, k_out, k_in, rank)  # type: ignore[arg-type]
        outer = mixing == "diagonal_outer"
        tensors = [
            against_guard((tokens, k_in * n_b), dtype),
            against_guard((k_in, rank, n_b), dtype),
            against_guard(gates[0], dtype),
            against_guard((k_out, m_b, rank), dtype),
            against_guard((k_out * m_b,), dtype),
            against_guard(gates[1], dtype) if outer else None,
            against_guard(gates[2], dtype) if outer else None,
        ]
        for tensor in tensors:
            if tensor is not None:
                tensor.requires_grad_()
        out = nanomoe.nanomoe_linear(*tensors)
        out.backward(against_guard(tuple(out.shape), dtype))
        cases += 1
    return cases


def test_no_kernel_reads_past_its_operands() -> None:
    done = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode} (-11: a read hit the guard page)\n" + (
        done.stdout + done.stderr
    )
    assert f"{len(MIXINGS) * len(SHAPES) * len(TOKENS) * 2} cases" in done.stdout


if __name__ == "__main__":
    print(f"{run_cases()} cases")
