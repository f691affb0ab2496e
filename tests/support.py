"""Shared test helpers: random NanoMoE arguments and comparison with the float64 reference."""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from nanomoe.budget import gate_shapes
from nanomoe.reference import nanomoe_linear_reference

# Relative error allowed against the float64 reference (SPEC section 3).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
HALF_DTYPES = (torch.bfloat16, torch.float16)
# The gradients of nanomoe.linear, in the order of its arguments.
NAMES = ("x", "down", "mix", "up", "bias", "mix_left", "mix_right")


@dataclass
class Case:
    x: Tensor
    down: Tensor
    mix: Tensor
    up: Tensor
    bias: Optional[Tensor]
    mix_left: Optional[Tensor]
    mix_right: Optional[Tensor]

    def args(self) -> tuple[Optional[Tensor], ...]:
        return (self.x, self.down, self.mix, self.up, self.bias, self.mix_left, self.mix_right)

    def map(self, fn) -> "Case":
        return Case(*(None if t is None else fn(t) for t in self.args()))


def make_case(
    lead: tuple[int, ...],
    k_out: int,
    k_in: int,
    n_b: int,
    m_b: int,
    rank: int,
    mixing: str,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Case:
    """Random arguments of unit-scale entries (gates included, so every term matters)."""

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    shapes = gate_shapes(mixing, k_out, k_in, rank)  # type: ignore[arg-type]
    outer = mixing == "diagonal_outer"
    return Case(
        x=rand(*lead, k_in * n_b),
        down=rand(k_in, rank, n_b),
        mix=rand(*shapes[0]),
        up=rand(k_out, m_b, rank),
        bias=rand(k_out * m_b) if bias else None,
        mix_left=rand(*shapes[1]) if outer else None,
        mix_right=rand(*shapes[2]) if outer else None,
    )


def reference64(case: Case) -> Tensor:
    """The float64 reference on exactly the values in case (already rounded to its dtype)."""
    return nanomoe_linear_reference(*case.map(lambda t: t.double()).args())


def magnitude(case: Case) -> Case:
    """The case with every entry replaced by its absolute value. NanoMoE is multilinear in its
    tensors, so the output (and any gradient) of this case is the sum of its terms' magnitudes."""
    return case.map(lambda t: t.double().abs())


def relative_error(actual: Tensor, expected: Tensor, scale: Optional[Tensor] = None) -> float:
    """Norm of the error over the norm of ``scale`` (default: of ``expected``)."""
    expected = expected.double()
    size = (expected if scale is None else scale.double()).norm().item()
    error = (actual.double() - expected).norm().item()
    return error / size if size > 0 else error


def assert_close_to(
    actual: Tensor,
    expected: Tensor,
    dtype: torch.dtype,
    what: str = "",
    magnitude: Optional[Tensor] = None,
) -> None:
    """Relative error within TOLERANCE[dtype].

    For bfloat16 and float16, intermediates are rounded to that dtype (as in a chain of half
    precision matmuls), so where the sum cancels no implementation meets a pointwise relative bound:
    there the error is measured against ``magnitude``, the same sums taken over absolute values of
    their terms (the standard bound for a rounded dot product). float32 and float64 are held to
    plain relative error.
    """
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    error = relative_error(actual, expected, magnitude if dtype in HALF_DTYPES else None)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g} > {TOLERANCE[dtype]}"


def grads_of(fn, case: Case, grad_out: Tensor, wanted: tuple[str, ...] = NAMES) -> dict:
    """Gradients of ``fn(*case.args())`` by autograd, for the tensors named in ``wanted``.

    Every tensor present in ``case`` gets an entry: its gradient, or None if not asked for. The
    leaves are detached views, so ``fn`` sees each tensor's exact layout (strides, offset).
    """
    leaves = case.map(torch.Tensor.detach)
    for name in wanted:
        tensor = getattr(leaves, name)
        if tensor is not None:
            tensor.requires_grad_()
    fn(*leaves.args()).backward(grad_out)
    return {name: getattr(leaves, name).grad for name in NAMES if getattr(leaves, name) is not None}


def assert_kernel_grads_match(case: Case, grad_out: Tensor, dtype: torch.dtype, label: str) -> None:
    """Every gradient of the kernel (case in dtype, grad_out float64, rounded to dtype for it)
    against the float64 reference's, each within assert_close_to's bound."""
    got = grads_of(torch.ops.nanomoe.linear, case, grad_out.to(dtype))
    expected = grads_of(nanomoe_linear_reference, case.map(torch.Tensor.double), grad_out)
    scale = grads_of(nanomoe_linear_reference, magnitude(case), grad_out.abs())
    for name, grad in got.items():
        assert_close_to(grad, expected[name], dtype, f"grad of {name}, {label}", scale[name])
