"""Gradients of the CPU kernels: gradcheck in float64, and every dtype against the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import CPU_DTYPES, NAMES, assert_close_to, grads_of, magnitude, make_case

from nanomoe.budget import MIXINGS
from nanomoe.reference import nanomoe_linear_reference


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(mixing: str, bias: bool) -> None:
    case = make_case((2, 3), 2, 3, 2, 3, 2, mixing, torch.float64, bias)
    inputs = [t.requires_grad_() for t in case.args() if t is not None]

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        it = iter(tensors)
        args = [next(it) if t is not None else None for t in case.args()]
        return torch.ops.nanomoe.linear(*args)

    assert torch.autograd.gradcheck(fn, inputs)


@settings(max_examples=80, deadline=None)
@given(
    lead=st.sampled_from([(0,), (1,), (5,), (2, 7), (90,)]),
    k_out=st.integers(1, 4),
    k_in=st.integers(1, 4),
    n_b=st.integers(1, 7),
    m_b=st.integers(1, 7),
    rank=st.integers(1, 9),
    mixing=st.sampled_from(MIXINGS),
    dtype=st.sampled_from(CPU_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_gradients_match_reference(lead, k_out, k_in, n_b, m_b, rank, mixing, dtype, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    case = make_case(lead, k_out, k_in, n_b, m_b, rank, mixing, dtype, True, generator)
    grad_out = torch.randn(*lead, k_out * m_b, generator=generator, dtype=torch.float64)
    got = grads_of(torch.ops.nanomoe.linear, case, grad_out.to(dtype))
    expected = grads_of(nanomoe_linear_reference, case.map(torch.Tensor.double), grad_out)
    scale = grads_of(nanomoe_linear_reference, magnitude(case), grad_out.abs())
    for name, grad in got.items():
        assert_close_to(grad, expected[name], dtype, f"grad of {name}", scale[name])


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("wanted", [("x",), ("down", "up"), ("mix", "mix_left"), ("bias",)])
def test_only_requested_gradients(mixing: str, wanted: tuple[str, ...]) -> None:
    case = make_case((300,), 3, 2, 5, 4, 3, mixing, torch.float64)
    grad_out = torch.randn(300, 12, dtype=torch.float64)
    got = grads_of(torch.ops.nanomoe.linear, case, grad_out, wanted)
    expected = grads_of(nanomoe_linear_reference, case, grad_out, wanted)
    for name in NAMES:
        if name in got and name in wanted:
            assert_close_to(got[name], expected[name], torch.float64, name)
        elif name in got:
            assert got[name] is None, f"{name} got a gradient it did not ask for"


def test_backward_op_leaves_unrequested_outputs_empty() -> None:
    case = make_case((4,), 2, 2, 3, 3, 2, "diagonal", torch.float32)
    _, hidden = torch.ops.nanomoe.linear_forward(*case.args())
    grad_out = torch.randn(4, 6)
    mask = [False, True, False, False, True, False, False]
    grads = torch.ops.nanomoe.linear_backward(
        grad_out, case.x, case.down, case.mix, case.up, None, None, hidden, mask
    )
    assert [g is not None for g in grads] == mask
    torch.testing.assert_close(grads[4], grad_out.sum(0))


def test_no_grad_keeps_nothing_and_matches() -> None:
    case = make_case((8,), 2, 2, 3, 3, 2, "full", torch.float32)
    case.down.requires_grad_()
    with torch.no_grad():
        out = torch.ops.nanomoe.linear(*case.args())
    assert out.grad_fn is None
    assert torch.equal(out, torch.ops.nanomoe.linear(*case.args()).detach())
