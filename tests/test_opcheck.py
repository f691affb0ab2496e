"""torch.library.opcheck on every operator and variant: schema, autograd registration, fake kernels,
and AOT dispatch (what torch.compile relies on)."""

import pytest
import torch
from support import make_case

from nanomoe.budget import MIXINGS

DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_linear(mixing: str, dtype: torch.dtype, requires_grad: bool) -> None:
    case = make_case((3, 5), 2, 3, 4, 3, 2, mixing, dtype)
    args = [t.requires_grad_(requires_grad) if t is not None else None for t in case.args()]
    torch.library.opcheck(torch.ops.nanomoe.linear.default, args)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_linear_forward(mixing: str) -> None:
    case = make_case((7,), 3, 2, 4, 3, 5, mixing, torch.float32, bias=False)
    torch.library.opcheck(torch.ops.nanomoe.linear_forward.default, case.args())


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize(
    "mask", [[True] * 7, [True, False, True, False, True, False, True], [False] * 7]
)
def test_linear_backward(mixing: str, mask: list[bool]) -> None:
    case = make_case((2, 3), 3, 2, 4, 3, 5, mixing, torch.float32)
    _, hidden = torch.ops.nanomoe.linear_forward(*case.args())
    outer = mixing == "diagonal_outer"
    mask = [want and (outer or i < 5) for i, want in enumerate(mask)]
    grad_out = torch.randn(2, 3, 9)
    args = (grad_out, case.x, case.down, case.mix, case.up, case.mix_left, case.mix_right, hidden)
    torch.library.opcheck(torch.ops.nanomoe.linear_backward.default, (*args, mask))
