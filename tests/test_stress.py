"""Stress: many calls leave memory flat, Python threads calling at once get the serial results, and
the CPU kernels' results are bitwise reproducible.

Bitwise across thread counts (float32 and bfloat16, the project's own kernels): the output and the
input's gradient are, for any count, since threads split tokens in shares that start at multiples
of 48 (kShareTokens) or split weight rows, never a sum. The weight gradients (down, mix, mix_left,
mix_right, up, bias) are not: each thread sums the tokens of its share and the threads' sums are
added at the end, so another count adds in another order (the same bits for a fixed count). float64
runs on ATen's BLAS, whose summation order is its own, so it is held to none of these.
"""

import functools
import os
import threading
from typing import Callable

import pytest
import torch
from support import NAMES, Case, assert_close_to, grads_of, make_case

import nanomoe
from nanomoe.budget import MIXINGS

op = torch.ops.nanomoe.linear
# The kernels the tests go through: few tokens (weights read in place), many tokens (packed
# weights, parallel token tiles, the backward's own kernels from 17 tokens), several shares.
TOKENS = (5, 40, 300)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_ten_thousand_calls_leave_resident_memory_flat() -> None:
    torch.manual_seed(0)
    layers = [
        nanomoe.NanoMoELinear(64, 48, 8, 4, mixing, dtype=dtype)
        for mixing in MIXINGS
        for dtype in KERNEL_DTYPES
    ]
    inputs = {dtype: [torch.randn(t, 64, dtype=dtype) for t in (5, 40)] for dtype in KERNEL_DTYPES}

    def call(i: int) -> None:
        layer = layers[i % len(layers)]
        x = inputs[layer.down.dtype][i // len(layers) % 2].requires_grad_()
        torch.autograd.grad(layer(x).sum(), [x, *layer.parameters()])

    for i in range(1000):  # warm up: allocator pools, per-thread buffers, packed weights
        call(i)
    before = resident_bytes()
    for i in range(10_000):
        call(i)
    growth = resident_bytes() - before
    # Measured: under 0.1 MiB. 2 MiB is about 200 bytes a call: a leaked tensor of any size fails.
    assert growth < 2 * 2**20, f"resident memory grew by {growth / 2**20:.2f} MiB in 10,000 calls"


def forward_and_grads(case: Case, grad_out: torch.Tensor) -> dict:
    return {"out": op(*case.args()), **grads_of(op, case, grad_out)}


def random_calls(count: int, seed: int) -> list[tuple[Case, torch.Tensor]]:
    """Different layers, dtypes and token counts, each with its gradient of the output: a few
    blocks at rank 18 and many at rank 4 (whose gates mix by block, with per-thread buffers)."""
    generator = torch.Generator().manual_seed(seed)
    calls = []
    for i in range(count):
        mixing, dtype, tokens = MIXINGS[i % 4], KERNEL_DTYPES[i // 4 % 2], TOKENS[i % 3]
        k_out, k_in, n_b, m_b, rank = (3, 2, 20, 24, 18) if i // 8 % 2 else (16, 16, 3, 2, 4)
        case = make_case((tokens,), k_out, k_in, n_b, m_b, rank, mixing, dtype, True, generator)
        grad_out = torch.randn(tokens, k_out * m_b, generator=generator).to(dtype)
        calls.append((case, grad_out))
    return calls


def assert_same(got: dict, expected: dict, what: str) -> None:
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{what}: {name} differs"


def test_four_python_threads_at_once_get_the_serial_results() -> None:
    calls = [random_calls(16, seed) for seed in range(4)]
    expected = [[forward_and_grads(*call) for call in thread_calls] for thread_calls in calls]
    rounds = 5  # several rounds, so the threads' calls overlap whatever their order
    results: list[list[dict]] = [[] for _ in calls]
    start = threading.Barrier(len(calls))

    def work(t: int) -> None:
        start.wait()
        for _ in range(rounds):
            results[t] += [forward_and_grads(*call) for call in calls[t]]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for t, thread_results in enumerate(results):
        assert len(thread_results) == rounds * len(calls[t]), f"thread {t} did not finish"
        for i, got in enumerate(thread_results):
            # Bitwise, every round: each thread's calls run on as many threads as serial ones.
            call = i % len(calls[t])
            assert_same(
                got, expected[t][call], f"thread {t}, round {i // len(calls[t])}, call {call}"
            )


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_bitwise_same_run_to_run(tokens: int, mixing: str, dtype: torch.dtype) -> None:
    case = make_case((tokens,), 4, 4, 16, 20, 33, mixing, dtype)
    grad_out = torch.randn(tokens, 80).to(dtype)
    first = forward_and_grads(case, grad_out)
    for run in range(3):
        assert_same(forward_and_grads(case, grad_out), first, f"run {run + 2}")


def with_threads(count: int, fn: Callable[[], dict]) -> dict:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(count)
        return fn()
    finally:
        torch.set_num_threads(threads)


# Depths of 32 and more (rank 33, blocks of 96) so that AMX, where bfloat16 runs on it, sums
# otherwise than the register tile: the same tokens must go to AMX for any thread count.
@pytest.mark.parametrize("tokens", (*TOKENS, 1001))
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_bitwise_same_for_any_thread_count(tokens: int, mixing: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(tokens)
    # And 16 blocks of rank 16: the gates on AMX in bfloat16, and up to 16 tokens the backward's
    # tile loop (backward_projected).
    for k_out, k_in, n_b, m_b, rank in [(3, 2, 96, 40, 33), (16, 16, 4, 3, 16)]:
        case = make_case((tokens,), k_out, k_in, n_b, m_b, rank, mixing, dtype, True, generator)
        grad_out = torch.randn(tokens, k_out * m_b, generator=generator).to(dtype)
        run = functools.partial(forward_and_grads, case, grad_out)
        single = with_threads(1, run)
        for count in (2, 3, 4):
            got = with_threads(count, run)
            assert_same(got, {name: single[name] for name in ("out", "x")}, f"{count} threads")
            for name in NAMES[1:]:  # the weight gradients: summed per thread, see the docstring
                if name in got:
                    label = f"grad of {name}, {count} threads against 1, K = {k_out}"
                    assert_close_to(got[name], single[name].double(), dtype, label)
