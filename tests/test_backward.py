"""Gradients of the CPU kernels: gradcheck in float64, and every dtype against the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (
    CPU_DTYPES,
    NAMES,
    assert_close_to,
    assert_kernel_grads_match,
    grads_of,
    magnitude,
    make_case,
    reference64,
    relative_error,
)

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


# The AVX-512 backward's edges: from 17 tokens on (fewer keep ATen's BLAS), the register tile
# (12 rows x 32 columns), the thread tile (96 tokens, the depth of each weight-gradient sum),
# 16-lane tails and odd depths (bfloat16 multiplies pairs of tokens and of features).
@pytest.mark.parametrize("tokens", [17, 23, 95, 97, 397])
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_tile_edges(tokens: int, mixing: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(tokens)
    # (4, 4, 16, 12, 16): the projections' panels at most 16 columns wide (the narrow tile; off
    # AMX in bfloat16, where 2 blocks' down-projections are one 32-column product).
    shapes = [(2, 3, 33, 40, 17), (1, 2, 64, 31, 32), (3, 1, 7, 65, 33), (4, 4, 16, 12, 16)]
    for k_out, k_in, n_b, m_b, rank in shapes:
        case = make_case((tokens,), k_out, k_in, n_b, m_b, rank, mixing, dtype, True, generator)
        grad_out = torch.randn(tokens, k_out * m_b, generator=generator, dtype=torch.float64)
        label = f"{mixing} {dtype} tokens={tokens} rank={rank} n_b={n_b}"
        assert_kernel_grads_match(case, grad_out, dtype, label)


# Where the weight-gradient sums outweigh a 96-token tile's copies of x and grad_out, the backward
# keeps tiles of 192 tokens (projected_backward.cpp, backward_tiling): their edges. A full gate over
# blocks of 4 features at rank 24 has 96 x 96 float32 sums (36 KiB), against copies of
# 2 x 96 x 32 elements (24 KiB in float32).
@pytest.mark.parametrize("tokens", [191, 193])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_sums_tile_edges(tokens: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(tokens)
    case = make_case((tokens,), 4, 4, 4, 4, 24, "full", dtype, True, generator)
    grad_out = torch.randn(tokens, 16, generator=generator, dtype=torch.float64)
    assert_kernel_grads_match(case, grad_out, dtype, f"full {dtype} tokens={tokens}")


# bfloat16 on AMX: a product shallower than the tile unit's 32-deep step runs on tiles shaped to its
# depth (amx.cpp), a deeper one pads a copy of its last step. Depths 2 to 30 and odd ones: features
# per block (the down-projection, grad_mixed), ranks (the up-projection, grad_x) and tokens (a
# weight gradient sums over a thread tile's tokens: 18 or 30, and 30 of 222 on one thread). One
# block count is 16, so the gates run on AMX too.
@pytest.mark.parametrize("tokens", [18, 30, 33, 222])
@pytest.mark.parametrize("mixing", MIXINGS)
def test_shallow_products(tokens: int, mixing: str) -> None:
    generator = torch.Generator().manual_seed(tokens)
    shapes = [(2, 3, 32, 16, 16), (3, 2, 6, 30, 24), (2, 2, 2, 10, 20), (1, 4, 33, 4, 18)]
    for k_out, k_in, n_b, m_b, rank in [*shapes, (16, 16, 2, 14, 16)]:
        case = make_case(
            (tokens,), k_out, k_in, n_b, m_b, rank, mixing, torch.bfloat16, True, generator
        )
        label = f"{mixing} tokens={tokens} K=({k_out}, {k_in}) n_b={n_b} m_b={m_b} rank={rank}"
        got = torch.ops.nanomoe.linear(*case.args())
        scale = reference64(magnitude(case))
        assert_close_to(got, reference64(case), torch.bfloat16, f"output, {label}", scale)
        grad_out = torch.randn(tokens, k_out * m_b, generator=generator, dtype=torch.float64)
        assert_kernel_grads_match(case, grad_out, torch.bfloat16, label)


# diagonal_outer at a small rank (up to 4, or 8 in bfloat16 on AMX) from 17 tokens on runs as one
# dense (K_out r, K_in r) matrix (csrc/cpu/dense_gate.h), its gradient reduced to mix's, left's and
# right's at the end: odd and even ranks, one block and many, 16 tokens (the elementwise kernels)
# against 17, on one thread and two.
@pytest.mark.parametrize("tokens", [16, 17, 100, 397])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_diagonal_outer_as_dense_matrix(tokens: int, dtype: torch.dtype, threads: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    shapes = [(1, 1, 4, 3, 1), (3, 5, 7, 2, 3), (4, 2, 16, 9, 4), (16, 16, 2, 3, 8)]
    shapes.append((5, 3, 6, 4, 7))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k_out, k_in, n_b, m_b, rank in shapes:
            case = make_case(
                (tokens,), k_out, k_in, n_b, m_b, rank, "diagonal_outer", dtype, True, generator
            )
            label = f"tokens={tokens} K=({k_out}, {k_in}) rank={rank} threads={threads}"
            got = torch.ops.nanomoe.linear(*case.args())
            scale = reference64(magnitude(case))
            assert_close_to(got, reference64(case), dtype, f"output, {label}", scale)
            grad_out = torch.randn(tokens, k_out * m_b, generator=generator, dtype=torch.float64)
            assert_kernel_grads_match(case, grad_out, dtype, label)
    finally:
        torch.set_num_threads(previous)


# bfloat16 diagonal_outer mixing with rank positions as the lanes takes its dot products <right,
# hidden> (and the transposed gate's and the gate gradients' <left, grad_mixed>) from bfloat16
# pairs from 32 tokens on (csrc/cpu/gate_tile.cpp, pair_dots): on AMX 32 tokens per product, the
# rows past a multiple of 16 padded; without AMX by vdpbf16ps, 8 tokens at a time, the lanes two
# pairs of rank positions per block where a side has 8 blocks or fewer; it then mixes by vdpbf16ps
# on pairs of source blocks. Below 32 tokens, AVX-512 FMAs on widened rows. Both round the dot
# products to bfloat16 and sum exact products in float32, so each token's output and grad_x must
# agree with the same token run alone to within a rare rounding flip: 1e-3 relative, where leaving
# out one rank position of the dot products measured 0.1 and over (and leaving the dot products
# unrounded below 32 tokens, over 1e-3). The gate's gradients, whose
# bfloat16 rounding alone is 3e-3 here, are held to 1e-2 of the float64 reference (plain relative
# error): the same omission measured 0.9 and over.
@pytest.mark.parametrize("tokens", [32, 50, 100])
@pytest.mark.parametrize("threads", [1, 2])
def test_diagonal_outer_dots_match_per_token(tokens: int, threads: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    # (k_out, k_in, n_b, m_b, rank): 16 blocks a side or fewer (one 16-column product), 20 (one
    # of 32) and 40 (two), as destination (k_out) and as the transposed gate's and left's (k_in);
    # odd ranks, ranks below one 32-deep step (10, 17) and past it (33, 48).
    shapes = [(8, 8, 16, 16, 64), (3, 5, 7, 9, 33), (2, 4, 8, 8, 65), (1, 1, 16, 16, 17)]
    shapes += [(20, 3, 5, 7, 64), (40, 2, 3, 4, 128), (2, 20, 3, 5, 64), (1, 40, 2, 3, 128)]
    shapes += [(1, 2, 8, 8, 10), (2, 3, 4, 4, 48)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k_out, k_in, n_b, m_b, rank in shapes:
            case = make_case(
                (tokens,),
                k_out,
                k_in,
                n_b,
                m_b,
                rank,
                "diagonal_outer",
                torch.bfloat16,
                True,
                generator,
            )
            grad_out = torch.randn(tokens, k_out * m_b, generator=generator).bfloat16()
            label = f"tokens={tokens} K=({k_out}, {k_in}) rank={rank} threads={threads}"
            together = grads_of(torch.ops.nanomoe.linear, case, grad_out, ("x",))
            out = torch.ops.nanomoe.linear(*case.args())
            alone_out, alone_grad_x = [], []
            for t in range(tokens):
                one = case.map(lambda u: u)
                one.x = case.x[t : t + 1]
                alone_out.append(torch.ops.nanomoe.linear(*one.args()))
                alone_grad_x.append(
                    grads_of(torch.ops.nanomoe.linear, one, grad_out[t : t + 1], ("x",))["x"]
                )
            for name, got, alone in [
                ("output", out, torch.cat(alone_out)),
                ("grad_x", together["x"], torch.cat(alone_grad_x)),
            ]:
                error = relative_error(got, alone)
                assert error <= 1e-3, f"{name}, {label}: {error:.3g} from the tokens run alone"
            gate = ("mix", "mix_left", "mix_right")
            got = grads_of(torch.ops.nanomoe.linear, case, grad_out, gate)
            expected = grads_of(
                nanomoe_linear_reference, case.map(torch.Tensor.double), grad_out.double(), gate
            )
            for name in gate:
                error = relative_error(got[name], expected[name])
                assert error <= 1e-2, f"grad of {name}, {label}: relative error {error:.3g}"
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("wanted", [("x",), ("down", "up"), ("mix", "mix_left"), ("bias",)])
def test_kernel_computes_only_requested(mixing: str, dtype: torch.dtype, wanted: tuple) -> None:
    case = make_case((300,), 3, 2, 5, 4, 3, mixing, dtype)
    grad_out = torch.randn(300, 12, dtype=dtype)
    got = grads_of(torch.ops.nanomoe.linear, case, grad_out, wanted)
    expected = grads_of(nanomoe_linear_reference, case.map(torch.Tensor.double), grad_out.double())
    for name in NAMES:
        if name in got and name in wanted:
            assert_close_to(got[name], expected[name], dtype, name)
        elif name in got:
            assert got[name] is None, f"{name} got a gradient it did not ask for"


@pytest.mark.parametrize("mixing", ["scalar", "diagonal", "diagonal_outer"])
@pytest.mark.parametrize("k_out, k_in", [(8, 8), (5, 3), (3, 7)])
def test_gate_passes_together_match_apart(mixing: str, k_out: int, k_in: int) -> None:
    """bfloat16's elementwise gates run their three backward passes at once where every gradient
    is asked for (gate_tile::backward_passes; diagonal_outer where its dot products come from
    bfloat16 pairs, from 32 tokens), each alone otherwise: the same bits. 100 tokens end in a
    group shorter than 8; diagonal_outer's 123 end in a 27-token pass of dot products (groups of
    8, 8, 8 and 3), at a rank (72) where the dot products from pairs and the FMAs' differ in their
    bits, so that taking them from the other source would show. Unequal block counts a side tell
    the forward gate from the transposed one, and leave 1 to 3 destination blocks over."""
    outer = mixing == "diagonal_outer"
    tokens, rank = (123, 72) if outer else (100, 24)
    generator = torch.Generator().manual_seed(7)
    case = make_case((tokens,), k_out, k_in, 16, 12, rank, mixing, torch.bfloat16, True, generator)
    grad_out = torch.randn(tokens, k_out * 12, generator=generator).bfloat16()
    together = grads_of(torch.ops.nanomoe.linear, case, grad_out)
    for name in ("x", "mix", "up", "down", *(("mix_left", "mix_right") if outer else ())):
        apart = grads_of(torch.ops.nanomoe.linear, case, grad_out, (name,))[name]
        assert torch.equal(together[name], apart), f"grad of {name} ({mixing})"


@pytest.mark.parametrize("tokens", [200, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kernel_reads_strided_inputs(tokens: int, dtype: torch.dtype) -> None:
    """The tile loop (float32, 200 tokens), and ATen's products with the weight gradients as one
    batched product over the blocks (16 tokens, or float64)."""
    case = make_case((tokens,), 2, 2, 16, 16, 8, "diagonal", dtype)
    wide = torch.randn(tokens, 64, dtype=dtype)
    case.x = wide[:, ::2]  # rows 64 apart, elements 2 apart
    grad_out = torch.randn(32, tokens, dtype=dtype).t()  # column-major
    got = grads_of(torch.ops.nanomoe.linear, case, grad_out)
    expected = grads_of(nanomoe_linear_reference, case.map(torch.Tensor.double), grad_out.double())
    for name, grad in got.items():
        assert_close_to(grad, expected[name], dtype, f"grad of {name}")


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradients_repeat_bitwise_and_agree_across_threads(
    mixing: str, dtype: torch.dtype
) -> None:
    # Each thread sums its own tiles' weight gradients and the threads' sums are added in order:
    # a fixed thread count gives the same bits every run; another count sums in another order.
    # grad_x is each token's own sum, the same bits for any count (the products take the tokens
    # a chunk at a time within tiles that start at multiples of 48, however the threads share).
    case = make_case((500,), 3, 2, 20, 24, 18, mixing, dtype)
    grad_out = torch.randn(500, 72, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = grads_of(torch.ops.nanomoe.linear, case, grad_out)
        again = grads_of(torch.ops.nanomoe.linear, case, grad_out)
        torch.set_num_threads(1)
        single = grads_of(torch.ops.nanomoe.linear, case, grad_out)
    finally:
        torch.set_num_threads(threads)
    for name, grad in first.items():
        assert torch.equal(grad, again[name]), name
        assert_close_to(single[name], grad.double(), dtype, f"grad of {name}, 1 against 2 threads")
    assert torch.equal(single["x"], first["x"]), "grad of x, 1 against 2 threads"


def assert_grads_match_reference(
    tokens: int, mixing: str, dtype: torch.dtype, shapes: list[tuple[int, int, int]]
) -> None:
    """Every gradient against the float64 reference, for each (K_out, K_in, rank) in shapes
    (blocks of 3 input and 2 output features)."""
    generator = torch.Generator().manual_seed(tokens)
    for k_out, k_in, rank in shapes:
        case = make_case((tokens,), k_out, k_in, 3, 2, rank, mixing, dtype, True, generator)
        grad_out = torch.randn(tokens, k_out * 2, generator=generator, dtype=torch.float64)
        assert_kernel_grads_match(case, grad_out, dtype, f"K=({k_out}, {k_in}) rank={rank}")


@pytest.mark.parametrize("tokens", [0, 1, 5, 13, 16, 131])
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_blocks_small_ranks(tokens: int, mixing: str, dtype: torch.dtype) -> None:
    """The transposed gate mixes by block too (its destination is the input blocks), and the gate's
    gradients are summed by block; the full gate's transpose is one product. With 16 blocks or more
    on a side, 16 tokens or fewer take the tile loop too (backward_projected)."""
    # (16, 32, 16), (32, 16, 32): diagonal_outer by block where blocks and rank fill lanes alike.
    shapes = [(64, 64, 4), (20, 36, 3), (36, 20, 1), (17, 5, 2), (16, 32, 16), (32, 16, 32)]
    assert_grads_match_reference(tokens, mixing, dtype, shapes)


@pytest.mark.parametrize("tokens", [5, 131])
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gate_tiles(tokens: int, mixing: str, dtype: torch.dtype) -> None:
    """Ranks that fill the lanes: the gate's gradients are summed for 4 x 4 (output, input) blocks
    at once, so block counts that leave partial ones, and ranks over 16 with a partial last 16;
    at 16 blocks or more each way, bfloat16's gates and their transposes run on AMX (odd counts:
    the last pair's partner is zero), and so do the scalar gate's gradient at an even rank of 16
    or more (32 tokens a product; an odd rank keeps the float32 sums) and the diagonal and
    diagonal_outer gates' gradients (32 tokens a product, an odd count's last partner zero).
    diagonal_outer's rank-one gradients take 4 pairs of blocks by 64 lanes at once: 9 and 5
    blocks leave partial sets of pairs, ranks 80 and 100 a second set of lanes, full or masked. On
    AMX its grad_left and grad_right sums take 16-column tiles past a multiple of 32: ranks 12, 16
    and 40."""
    shapes = [(6, 7, 17), (5, 18, 33), (17, 33, 24), (33, 16, 16), (16, 17, 17), (17, 33, 40)]
    shapes += [(16, 20, 12)]
    shapes += [(9, 2, 80), (3, 5, 100)]
    assert_grads_match_reference(tokens, mixing, dtype, shapes)


@pytest.mark.parametrize("tokens", [17, 131])
@pytest.mark.parametrize("mixing", MIXINGS)
def test_grouped_grad_mixed(tokens: int, mixing: str) -> None:
    """bfloat16 on AMX, a rank of 8 or less: grad_mixed's products of 32 / r blocks run as one with
    their block-diagonal up (projected_backward.cpp, grad_mixed_group). Block counts that are and
    are not multiples of the group, blocks of 3 to 32 outputs, ranks 2 to 8."""
    generator = torch.Generator().manual_seed(tokens)
    for k_out, m_b, rank in [(8, 16, 4), (4, 32, 8), (16, 3, 2), (12, 5, 8), (6, 7, 4)]:
        case = make_case((tokens,), k_out, 2, 8, m_b, rank, mixing, torch.bfloat16, True, generator)
        grad_out = torch.randn(tokens, k_out * m_b, generator=generator, dtype=torch.float64)
        label = f"{mixing} tokens={tokens} K_out={k_out} rank={rank} m_b={m_b}"
        assert_kernel_grads_match(case, grad_out, torch.bfloat16, label)


def test_grouped_grad_mixed_keeps_non_finite_gradients_in_their_block() -> None:
    """An Inf in one token's grad_out of output block 0 makes grad_mixed's block 0 of that token
    non-finite, but not block 1, its partner in the block-diagonal product (r = 4: 8 blocks a
    group; 0 * Inf there would be NaN): so the gate's gradient of output block 1 stays finite and
    matches the reference. The token is redone alone, whatever the tiling: grad_x (per token) has
    the same bits on 1 and 2 threads."""
    generator = torch.Generator().manual_seed(0)
    case = make_case((200,), 8, 2, 8, 4, 4, "diagonal", torch.bfloat16, True, generator)
    grad_out = torch.randn(200, 32, generator=generator, dtype=torch.float64)
    grad_out[101, 2] = float("inf")
    wanted = ("x", "mix")
    threads = torch.get_num_threads()
    try:
        got = {}
        for count in (1, 2):
            torch.set_num_threads(count)
            got[count] = grads_of(torch.ops.nanomoe.linear, case, grad_out.bfloat16(), wanted)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[1]["x"].view(torch.int16), got[2]["x"].view(torch.int16))
    expected = grads_of(nanomoe_linear_reference, case.map(torch.Tensor.double), grad_out, wanted)
    scale = grads_of(nanomoe_linear_reference, magnitude(case), grad_out.abs(), wanted)
    for count in (1, 2):
        mix = got[count]["mix"]
        assert not mix[0].isfinite().all()
        assert_close_to(mix[1:], expected["mix"][1:], torch.bfloat16, "", scale["mix"][1:])


@pytest.mark.parametrize("tokens", [40, 131])
@pytest.mark.parametrize("mixing", ["scalar", "diagonal_outer"])
def test_sixteen_column_products(tokens: int, mixing: str) -> None:
    """bfloat16 products whose weight panel is exactly 16 columns wide (blocks of 16 features, a
    rank of 16) take AMX's 16-column steps from a depth of 16 (rank 20: a partial second step;
    rank 8: the register tile), in the forward, grad_x, grad_mixed and the weight gradients."""
    generator = torch.Generator().manual_seed(tokens)
    for k_out, k_in, rank in [(3, 2, 16), (2, 3, 20), (2, 2, 8)]:
        case = make_case(
            (tokens,), k_out, k_in, 16, 16, rank, mixing, torch.bfloat16, True, generator
        )
        grad_out = torch.randn(tokens, k_out * 16, generator=generator, dtype=torch.float64)
        got = grads_of(torch.ops.nanomoe.linear, case, grad_out.bfloat16())
        expected = grads_of(nanomoe_linear_reference, case.map(torch.Tensor.double), grad_out)
        scale = grads_of(nanomoe_linear_reference, magnitude(case), grad_out.abs())
        for name, grad in got.items():
            label = f"grad of {name}, K=({k_out}, {k_in}) rank={rank}"
            assert_close_to(grad, expected[name], torch.bfloat16, label, scale[name])


@pytest.mark.parametrize(
    "mixing, dtype",
    [
        ("scalar", torch.float32),
        ("diagonal_outer", torch.float32),
        ("diagonal", torch.bfloat16),
        ("diagonal_outer", torch.bfloat16),
    ],
    ids=str,
)
def test_gate_gradients_add_up_over_tiles(mixing: str, dtype: torch.dtype) -> None:
    """One thread, 451 tokens: tiles of 96 tokens (of 192 where the gate's sums outweigh the
    tiles' copies of x and grad_out, as bfloat16 diagonal_outer's on AMX do here), the last of 67,
    each add into the same gate-gradient sums (float32: summed by block; bfloat16: in gate_amx's
    tiles of sums on AMX, whose last product has 3 tokens, an odd count)."""
    generator = torch.Generator().manual_seed(7)
    case = make_case((451,), 20, 36, 2, 2, 3, mixing, dtype, True, generator)
    grad_out = torch.randn(451, 40, generator=generator, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        got = grads_of(torch.ops.nanomoe.linear, case, grad_out.to(dtype))
    finally:
        torch.set_num_threads(threads)
    expected = grads_of(nanomoe_linear_reference, case.map(torch.Tensor.double), grad_out)
    scale = grads_of(nanomoe_linear_reference, magnitude(case), grad_out.abs())
    for name in ("mix", "mix_left", "mix_right"):
        if name in got:
            assert_close_to(got[name], expected[name], dtype, f"grad of {name}", scale[name])
