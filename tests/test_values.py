"""Values at the edges: NaN and Inf propagate as through nn.Linear, large magnitudes do not overflow
in half precision accumulation, and tensors of more than 2^31 elements are indexed correctly."""

from pathlib import Path

import pytest
import torch
from support import CPU_DTYPES, Case, assert_close_to, grads_of, magnitude, make_case, reference64

import nanomoe  # noqa: F401  (registers torch.ops.nanomoe)
from nanomoe.budget import MIXINGS
from nanomoe.reference import dense_weight_reference, nanomoe_linear_reference

op = torch.ops.nanomoe.linear

# Where a non-finite value is put: (tensor, index); x's row is a token a third into the batch. x's
# feature 9 is in input block 1, whose gate into output block 0 is zero (see poisoned).
POISONS = {
    "nan in x": ("x", (9,)),
    "inf in x": ("x", (7,)),
    "-inf in x": ("x", (30,)),
    "nan in down": ("down", (1, 2, 3)),
    "nan in mix": ("mix", (1, 0)),
    "nan in up": ("up", (2, 4, 1)),
    "nan in bias": ("bias", (5,)),
}


def poisoned(mixing: str, dtype: torch.dtype, tokens: int, poison: str) -> Case:
    case = make_case((tokens,), 3, 4, 8, 6, 5, mixing, dtype)
    case.mix[0, 1] = 0  # a zero gate still passes NaN on: 0 * NaN is NaN, in nn.Linear too
    name, index = POISONS[poison]
    value = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}[poison.split()[0]]
    getattr(case, name)[(tokens // 3, *index) if name == "x" else index] = value
    return case


# 5 tokens take the kernels that read weights in place, 40 the packed ones (several register tiles
# and, in bfloat16, an AMX block): the poisoned token shares a tile with clean ones.
@pytest.mark.parametrize("tokens", [5, 40])
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_non_finite_outputs_where_nn_linear_has_them(
    tokens: int, poison: str, mixing: str, dtype: torch.dtype
) -> None:
    case = poisoned(mixing, dtype, tokens, poison)
    wide = case.map(torch.Tensor.double)
    weight = dense_weight_reference(wide.down, wide.mix, wide.up, wide.mix_left, wide.mix_right)
    expected = torch.nn.functional.linear(wide.x, weight, wide.bias)
    got = op(*case.args())
    # The same outputs are non-finite, no more (NaN leaking into clean tokens) and no fewer (a
    # silent zero). Which of NaN and Inf an Inf input gives may differ: through the factors, the
    # products of an Inf meet with both signs before the up-projection, where nn.Linear sums them
    # once; a NaN input gives NaN in both.
    assert torch.equal(got.isfinite(), expected.isfinite()), (got, expected)
    if poison.startswith("nan"):
        assert torch.equal(got.isnan(), expected.isnan())
    assert not expected.isfinite().all()


@pytest.mark.parametrize("tokens", [5, 40])
@pytest.mark.parametrize("poison", ["nan in x", "nan in mix", "nan in up"])
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_non_finite_gradients_where_the_reference_has_them(
    tokens: int, poison: str, mixing: str, dtype: torch.dtype
) -> None:
    case = poisoned(mixing, dtype, tokens, poison)
    grad_out = torch.randn(tokens, 18, dtype=torch.float64)
    got = grads_of(op, case, grad_out.to(dtype))
    expected = grads_of(nanomoe_linear_reference, case.map(torch.Tensor.double), grad_out)
    for name, grad in got.items():
        assert torch.equal(grad.isnan(), expected[name].isnan()), f"grad of {name}"


def test_nan_in_grad_out_reaches_only_what_it_touches() -> None:
    case = make_case((40,), 3, 4, 8, 6, 5, "diagonal", torch.float32)
    grad_out = torch.randn(40, 18, dtype=torch.float64)
    grad_out[13, 4] = float("nan")
    got = grads_of(op, case, grad_out.float())
    expected = grads_of(nanomoe_linear_reference, case.map(torch.Tensor.double), grad_out)
    for name, grad in got.items():
        assert torch.equal(grad.isnan(), expected[name].isnan()), f"grad of {name}"


def devices_and_half_dtypes() -> list:
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    return [
        pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
        pytest.param("cuda", torch.float16, id="cuda-float16", marks=cuda),
        pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=cuda),
    ]


def sign_pairs(count: int) -> torch.Tensor:
    """+1, +1, -1, -1, ...: a running sum of 6e4 times these reaches 1.2e5, over float16's 65504."""
    return torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(count // 4)


@pytest.mark.parametrize(("device", "dtype"), devices_and_half_dtypes())
def test_sums_of_large_terms_do_not_overflow(device: str, dtype: torch.dtype) -> None:
    # 40 tokens (from 17 the backward runs its own kernels) of 5 features: 4 of magnitude 6e4 that
    # cancel along each token and along each feature, partial sums 1.2e5 in a half precision
    # accumulator, and one of 16. Every result is an exact integer when summed in float32. (bfloat16
    # has float32's range: there this checks the exact sums; float16 is the one that overflows.)
    tokens, big = 40, 60000.0
    x = torch.full((tokens, 5), 16.0)
    x[:, :4] = big * sign_pairs(tokens)[:, None] * sign_pairs(4)[None, :]
    ones = {"device": device, "dtype": dtype}
    args = [torch.ones(1, 1, 5, **ones), torch.ones(1, 1, **ones), torch.ones(1, 1, 1, **ones)]
    x = x.to(device, dtype).requires_grad_()
    for arg in args:
        arg.requires_grad_()
    out = op(x, *args, None, None, None)
    assert out.flatten().tolist() == [16.0] * tokens
    grad_x, grad_down, grad_mix, grad_up = torch.autograd.grad(out.sum(), [x, *args])
    assert grad_down.flatten().tolist() == [0.0] * 4 + [16.0 * tokens]
    assert grad_mix.item() == grad_up.item() == 16.0 * tokens
    assert grad_x.eq(1).all()


@pytest.mark.parametrize(("device", "dtype"), devices_and_half_dtypes())
def test_long_sums_are_accumulated_in_float32(device: str, dtype: torch.dtype) -> None:
    # In bfloat16, 256 + 1 rounds to 256 (float16: 2048 + 1 to 2048): a sum of ones kept in half
    # precision stops growing there, even split over 32 partial sums. 2^14 ones: exact in float32.
    # Rank 9: the forward's packed kernels (rank 1: its dot products); up passes hidden[0] through.
    ones = {"device": device, "dtype": dtype}
    for tokens, rank in [(3, 1), (40, 1), (40, 9)]:
        x = torch.ones(tokens, 2**14, **ones)
        down, mix = torch.ones(1, rank, 2**14, **ones), torch.ones(1, 1, **ones)
        up = torch.zeros(1, 1, rank, **ones)
        up[0, 0, 0] = 1
        out = op(x, down, mix, up, None, None, None)
        assert out.flatten().tolist() == [2.0**14] * tokens, f"{tokens} tokens, rank {rank}"
    # The weight gradients sum over tokens: 2^14 tokens.
    x = torch.ones(2**14, 2, **ones)
    down = torch.ones(1, 1, 2, **ones).requires_grad_()
    mix, up = (
        torch.ones(1, 1, **ones).requires_grad_(),
        torch.ones(1, 1, 1, **ones).requires_grad_(),
    )
    bias = torch.zeros(1, **ones).requires_grad_()
    out = op(x, down, mix, up, bias, None, None)
    grad_down, grad_mix, grad_up, grad_bias = torch.autograd.grad(out.sum(), [down, mix, up, bias])
    assert grad_down.flatten().tolist() == [2.0**14] * 2
    assert grad_mix.item() == grad_up.item() == 2.0**15
    assert grad_bias.item() == 2.0**14


@pytest.mark.parametrize("scale", [2.0**56, 2.0**-56], ids=["large", "small"])
@pytest.mark.parametrize("mixing", MIXINGS)
def test_bfloat16_magnitudes_near_its_range_limits(scale: float, mixing: str) -> None:
    # bfloat16 has float32's exponent range: x and down of magnitude 2^56 (2^-56) make products of
    # 2^112 (2^-112) and outputs up to about 2^120 (down to 2^-120), near float32's largest value
    # (smallest normal one, 2^-126), which the float32 accumulators hold without overflow (or
    # flushing to zero).
    generator = torch.Generator().manual_seed(0)
    case = make_case((40,), 2, 2, 16, 8, 4, mixing, torch.bfloat16, True, generator)
    case.x, case.down = case.x * scale, case.down * scale
    case.bias = case.bias * scale**2
    expected, scale_of_terms = reference64(case), reference64(magnitude(case))
    got = op(*case.args())
    assert got.isfinite().all()
    assert_close_to(got, expected, torch.bfloat16, f"{mixing} at {scale}", scale_of_terms)


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (0 where unknown)."""
    info = Path("/proc/meminfo")
    if not info.exists():
        return 0
    for line in info.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# Rows of 2^12 bfloat16 elements, 2^19 + 97 of them: 2^31 + 397,312 elements (4 GiB), the last 97
# rows (the last token tiles, whole) past element 2^31, where a 32-bit offset would wrap. The
# kernels index with 64 bits throughout; float32 and float64 (8 and 16 GiB) take the same index
# arithmetic, so bfloat16 alone is tested. About 3 s each.
BIG_ROWS, BIG_WIDTH = 2**19 + 97, 2**12
needs_memory = pytest.mark.skipif(
    available_memory() < 10 * 2**30, reason="needs 10 GiB of free memory"
)


@needs_memory
def test_input_of_more_than_2_31_elements() -> None:
    mixing = "diagonal_outer"  # every gate tensor; the gate does not see x
    generator = torch.Generator().manual_seed(0)
    # Clean rows are zero (their outputs are the bias); three rows, the last one among them, are
    # random and checked against the reference.
    x = torch.zeros(BIG_ROWS, BIG_WIDTH, dtype=torch.bfloat16)
    rows = [0, BIG_ROWS // 2, BIG_ROWS - 1]
    case = make_case((3,), 2, 4, BIG_WIDTH // 4, 4, 16, mixing, torch.bfloat16, True, generator)
    x[rows] = case.x
    assert x.numel() > 2**31
    leaves = case.map(torch.Tensor.detach)
    params = [t.requires_grad_() for t in leaves.args()[1:] if t is not None]
    out = op(x, *leaves.args()[1:])
    clean = torch.ones(BIG_ROWS, dtype=torch.bool)
    clean[rows] = False
    assert torch.equal(out[clean], case.bias.expand(BIG_ROWS - 3, -1))
    assert_close_to(
        out[rows], reference64(case), torch.bfloat16, "rows", reference64(magnitude(case))
    )
    # The weight gradients read every row of x; only the three random ones contribute.
    grad_out = torch.zeros_like(out)
    grad_out[rows] = torch.randn(3, 8, generator=generator).bfloat16()
    got = torch.autograd.grad(out, params, grad_out)
    expected = grads_of(
        nanomoe_linear_reference, case.map(torch.Tensor.double), grad_out[rows].double()
    )
    scale = grads_of(nanomoe_linear_reference, magnitude(case), grad_out[rows].double().abs())
    names = [
        name for name in ("down", "mix", "up", "bias", "mix_left", "mix_right") if name in expected
    ]
    for name, grad in zip(names, got):
        assert_close_to(grad, expected[name], torch.bfloat16, f"grad of {name}", scale[name])


@needs_memory
def test_output_of_more_than_2_31_elements() -> None:
    generator = torch.Generator().manual_seed(0)
    case = make_case(
        (BIG_ROWS,), 4, 2, 4, BIG_WIDTH // 4, 16, "diagonal", torch.bfloat16, True, generator
    )
    out = op(*case.args())
    assert out.numel() > 2**31
    rows = [0, BIG_ROWS // 2, BIG_ROWS - 1]
    few = case.map(lambda t: t)
    few.x = case.x[rows]
    assert_close_to(
        out[rows], reference64(few), torch.bfloat16, "rows", reference64(magnitude(few))
    )
