"""Shared test helpers: random NanoMoE arguments and comparison with the float64 reference."""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from nanomoe.budget import gate_shapes
from nanomoe.reference import nanomoe_linear_reference

# Relative error allowed against the float64 reference (SPEC section 3).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


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


def relative_error(actual: Tensor, expected: Tensor) -> float:
    expected = expected.double()
    scale = expected.norm().item()
    error = (actual.double() - expected).norm().item()
    return error / scale if scale > 0 else error


def assert_close_to(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    error = relative_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g} > {TOLERANCE[dtype]}"
