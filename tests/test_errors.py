"""Bad input gets a Python exception naming the problem, before any kernel runs (SPEC section 4)."""

import re
import subprocess
import sys

import pytest
import torch
from support import make_case

import nanomoe


def call(case):
    return torch.ops.nanomoe.linear(*case.args())


def good(mixing: str = "diagonal"):
    return make_case((4,), 2, 3, 4, 5, 6, mixing, torch.float32)


def with_(case, **changes):
    for name, value in changes.items():
        setattr(case, name, value)
    return case


BAD_CALLS = [
    ("x features", lambda c: with_(c, x=torch.randn(4, 11)), ValueError, "x has 11 features"),
    ("down not 3-D", lambda c: with_(c, down=c.down[0]), ValueError, "down must be"),
    ("up not 3-D", lambda c: with_(c, up=c.up[0]), ValueError, "up must be"),
    ("rank mismatch", lambda c: with_(c, up=torch.randn(2, 5, 7)), ValueError, "rank"),
    ("mix shape", lambda c: with_(c, mix=torch.randn(3, 2, 6)), ValueError, "mix must have shape"),
    ("mix 5-D", lambda c: with_(c, mix=torch.randn(2, 3, 6, 6, 1)), ValueError, "mix must be"),
    ("mix rank", lambda c: with_(c, mix=torch.randn(2, 3, 5)), ValueError, "mix must have shape"),
    ("left alone", lambda c: with_(c, mix_left=torch.randn(2, 3, 6)), ValueError, "come together"),
    (
        "outer on 2-D mix",
        lambda c: with_(
            c, mix=torch.randn(2, 3), mix_left=torch.randn(2, 3, 6), mix_right=torch.randn(2, 3, 6)
        ),
        ValueError,
        "3-D mix",
    ),
    ("bias shape", lambda c: with_(c, bias=torch.randn(9)), ValueError, "bias must have shape"),
    ("zero rank", lambda c: with_(c, down=torch.randn(3, 0, 4)), ValueError, "rank >= 1"),
    ("dtype", lambda c: with_(c, up=c.up.double()), TypeError, "up has dtype"),
    ("integer x", lambda c: c.map(lambda t: t.long()), TypeError, "floating point"),
    ("half on cpu", lambda c: c.map(torch.Tensor.half), TypeError, "supports float32"),
    ("device", lambda c: with_(c, bias=c.bias.to("meta")), RuntimeError, "bias is on meta"),
]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize(
    ("name", "spoil", "error", "message"), BAD_CALLS, ids=[b[0] for b in BAD_CALLS]
)
def test_bad_call(name, spoil, error, message, requires_grad: bool) -> None:
    case = spoil(good())
    if requires_grad and case.down.is_floating_point():
        case.down.requires_grad_()
    with pytest.raises(error, match=re.escape(message)):
        call(case)


def test_bad_backward_call() -> None:
    case = good()
    _, hidden = torch.ops.nanomoe.linear_forward(*case.args())
    args = (case.x, case.down, case.mix, case.up, None, None)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.nanomoe.linear_backward(
            torch.randn(4, 9), *args, hidden, [True] * 5 + [False] * 2
        )
    with pytest.raises(ValueError, match="hidden must have shape"):
        torch.ops.nanomoe.linear_backward(torch.randn(4, 10), *args, hidden[1:], [True] * 7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_blocks": 5}, "do not divide in_features"),
        ({"num_blocks": (3, 2)}, "do not divide out_features"),
        ({"num_blocks": 0}, "num_blocks must be >= 1"),
        ({"num_blocks": (2, 2, 2)}, "num_blocks must be an int or a pair"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"mixing": "diag"}, "unknown mixing 'diag'"),
    ],
)
def test_bad_layer(kwargs: dict, message: str) -> None:
    arguments = {"in_features": 12, "out_features": 8, "rank": 2, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        nanomoe.NanoMoELinear(**arguments)


def test_layer_rejects_wrong_input_width() -> None:
    layer = nanomoe.NanoMoELinear(12, 8, 2)
    with pytest.raises(ValueError, match="x has 10 features"):
        layer(torch.randn(3, 10))


def test_import_without_extension_says_how_to_build() -> None:
    # Block the compiled module as if it were never built: importing must fail, loudly.
    code = "import sys; sys.modules['nanomoe._C'] = None; import nanomoe"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr
