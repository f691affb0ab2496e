"""The CPU forward kernel against the float64 reference, over many shapes, layouts and dtypes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import CPU_DTYPES, assert_close_to, magnitude, make_case, reference64

import nanomoe
from nanomoe.budget import MIXINGS


def run(case):
    return torch.ops.nanomoe.linear(*case.args())


@settings(max_examples=150, deadline=None)
@given(
    lead=st.sampled_from([(0,), (1,), (3,), (17,), (2, 5), (70,), (3, 0, 2), ()]),
    k_out=st.integers(1, 4),
    k_in=st.integers(1, 4),
    n_b=st.integers(1, 9),
    m_b=st.integers(1, 9),
    rank=st.integers(1, 12),
    mixing=st.sampled_from(MIXINGS),
    dtype=st.sampled_from(CPU_DTYPES),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(lead, k_out, k_in, n_b, m_b, rank, mixing, dtype, bias, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    case = make_case(lead, k_out, k_in, n_b, m_b, rank, mixing, dtype, bias, generator)
    scale = reference64(magnitude(case))
    assert_close_to(run(case), reference64(case), dtype, f"{mixing} {dtype}", scale)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_many_tokens_run_in_parallel_tiles(mixing: str, dtype: torch.dtype) -> None:
    # More tokens than one tile, an odd count, so the tile loop and its ragged end are exercised.
    case = make_case((1001,), 3, 2, 24, 20, 7, mixing, dtype)
    scale = reference64(magnitude(case))
    assert_close_to(run(case), reference64(case), dtype, mixing, scale)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "channels_first"])
@pytest.mark.parametrize("mixing", MIXINGS)
def test_non_contiguous_input(layout: str, mixing: str) -> None:
    case = make_case((6, 5), 2, 3, 4, 5, 3, mixing, torch.float32)
    base = case.x
    if layout == "transposed":  # features not the fastest-moving dim
        x = base.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "sliced":  # every other token of a larger batch
        x = torch.cat([base, base], dim=1)[:, ::2]
    elif layout == "expanded":  # one token broadcast over the batch: stride 0
        x = base[:1, :1].expand(6, 5, -1)
    else:
        x = base.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not x.is_contiguous()
    case.x = x
    assert_close_to(run(case), reference64(case), torch.float32, layout)


def test_parameters_may_be_non_contiguous() -> None:
    case = make_case((9,), 2, 3, 4, 5, 3, "full", torch.float64)
    case.down = case.down.transpose(1, 2).contiguous().transpose(1, 2)
    case.mix = case.mix.transpose(2, 3).contiguous().transpose(2, 3)
    case.up = case.up.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    assert_close_to(run(case), reference64(case), torch.float64)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_same_result_for_any_thread_count(mixing: str) -> None:
    case = make_case((300,), 4, 4, 16, 16, 8, mixing, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(case)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, run(case))


def test_functional_and_module_agree_with_op() -> None:
    layer = nanomoe.NanoMoELinear(12, 8, 3, (2, 3), "diagonal_outer")
    x = torch.randn(4, 12)
    expected = torch.ops.nanomoe.linear(
        x, layer.down, layer.mix, layer.up, layer.bias, layer.mix_left, layer.mix_right
    )
    assert torch.equal(layer(x), expected)
    functional = nanomoe.nanomoe_linear(
        x, layer.down, layer.mix, layer.up, layer.bias, layer.mix_left, layer.mix_right
    )
    assert torch.equal(functional, expected)


def test_training_forward_returns_hidden() -> None:
    case = make_case((4, 3), 2, 3, 4, 5, 6, "diagonal", torch.float64)
    out, hidden = torch.ops.nanomoe.linear_forward(*case.args())
    assert torch.equal(out, run(case))
    x_blocks = case.x.reshape(12, 3, 4)
    expected = torch.einsum("tjn,jrn->tjr", x_blocks, case.down)
    torch.testing.assert_close(hidden, expected)


# The AVX-512 kernels' edges: the register tile (12 tokens x 32 rows, or 24 x 16 on a panel of at
# most 16 rows, then 12 x 16 and a tail), the thread tile (96 tokens),
# the switch from reading weights in place to packing them (more than 16 tokens), 16-lane vector
# tails, and odd depths (bfloat16 multiplies pairs of elements). On AMX, bfloat16 blocks of 32 and
# 16 tokens with the rest on the register tile, and depths that are not multiples of 32.
@pytest.mark.parametrize("tokens", [1, 4, 5, 11, 12, 13, 16, 17, 32, 48, 95, 97, 250])
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_tile_edges(tokens: int, mixing: str, dtype: torch.dtype) -> None:
    shapes = [(2, 3, 33, 40, 17), (1, 2, 64, 31, 32), (3, 1, 7, 65, 33), (4, 4, 16, 12, 16)]
    for k_out, k_in, n_b, m_b, rank in shapes:
        case = make_case((tokens,), k_out, k_in, n_b, m_b, rank, mixing, dtype)
        scale = reference64(magnitude(case))
        label = f"{mixing} {dtype} tokens={tokens} rank={rank} n_b={n_b}"
        assert_close_to(run(case), reference64(case), dtype, label, scale)


# Up to 16 tokens the weights are read in place. On AMX (bfloat16), each 16 weight rows are the
# tile unit's first operand and the tokens, their feature pairs side by side, its second: rows past
# the last 16 take dot products, segments (the full gate: one per input block) are summed apart,
# depths end mid-tile, and an odd-length segment keeps the dot products for the whole block.
@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 15, 16])
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_few_tokens_read_weights_in_place(tokens: int, mixing: str, dtype: torch.dtype) -> None:
    shapes = [(2, 3, 40, 17, 16), (1, 1, 34, 70, 36), (4, 4, 30, 32, 18), (2, 2, 96, 48, 64)]
    for k_out, k_in, n_b, m_b, rank in [*shapes, (2, 2, 33, 16, 16)]:
        case = make_case((tokens,), k_out, k_in, n_b, m_b, rank, mixing, dtype)
        # Also with up scaled down (by a power of 2: exact) until the bias dominates the output,
        # so that a bias added to the wrong rows shows above bfloat16's rounding of the products.
        for up_scale in (1.0, 2.0**-12):
            case.up = case.up * up_scale
            scale = reference64(magnitude(case))
            label = f"{mixing} {dtype} tokens={tokens} n_b={n_b} m_b={m_b} rank={rank} {up_scale}"
            assert_close_to(run(case), reference64(case), dtype, label, scale)


@pytest.mark.parametrize("tokens", [3, 16, 200, 1001])
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_same_for_one_and_two_threads(tokens: int, mixing: str, dtype: torch.dtype) -> None:
    # Threads split tokens (many) or weight rows (few), never a sum: every output element is
    # computed by the same operations in the same order whatever the thread count. On AMX, that
    # needs the same tokens to go to AMX blocks (which sum in another order than the register
    # tile) for any split: depths of 32 and more, so AMX's sums differ from the tile's.
    # (20, 16, 8): bfloat16 on AMX, 4 blocks' down-projections as one product (down_group).
    # K = 16, rank 16: diagonal_outer mixes by block, whose dot products sum in another order than
    # by rank position; every tile must take the same layout (decided per call).
    for blocks, n_b, m_b, rank in [
        (4, 20, 24, 18),
        (4, 96, 40, 64),
        (4, 20, 16, 8),
        (16, 3, 2, 16),
    ]:
        case = make_case((tokens,), blocks, blocks, n_b, m_b, rank, mixing, dtype)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = run(case)
            torch.set_num_threads(2)
            double = run(case)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(single, double), f"n_b={n_b} m_b={m_b} rank={rank}"


# Many blocks at small ranks: the elementwise gates mix with destination blocks as the vector lanes
# (gate_by_block.cpp), 12 tokens a group, 16 blocks a pass: block counts under, at and over 16,
# K_out != K_in both ways, ranks 1 to 15 (and 20, over 16 but filling lanes worse than 64 blocks);
# the full gate is one (K_out r, K_in r) product. diagonal_outer (and, without AMX, bfloat16's every
# gate) also where blocks and rank fill the lanes equally, up to rank 32: (16, 32, 16), (32, 16, 32)
# and (16, 23, 16); diagonal_outer sums over its
# source blocks in passes sized to L1, two at (64, 64, 4), (64, 32, 15) and (32, 16, 32) and a
# shorter last one at (16, 23, 16): 12 then 11. bfloat16 mixes there by vdpbf16ps on pairs of
# source blocks (odd K_in: the last partner zero), diagonal_outer at even ranks only (rank 15 keeps
# the float32 FMAs), its dot products over pairs of rank positions.
BY_BLOCK_SHAPES = [(64, 64, 4), (20, 36, 3), (36, 20, 1), (17, 5, 2), (64, 32, 15), (8, 8, 4)]


@pytest.mark.parametrize("tokens", [1, 12, 13, 17, 40, 131])
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_blocks_small_ranks(tokens: int, mixing: str, dtype: torch.dtype) -> None:
    more = [(64, 64, 20), (16, 32, 16), (32, 16, 32), (16, 23, 16)]
    for k_out, k_in, rank in [*BY_BLOCK_SHAPES, *more]:
        case = make_case((tokens,), k_out, k_in, 3, 2, rank, mixing, dtype)
        scale = reference64(magnitude(case))
        label = f"{mixing} {dtype} tokens={tokens} K=({k_out}, {k_in}) rank={rank}"
        assert_close_to(run(case), reference64(case), dtype, label, scale)


# bfloat16 on AMX, a rank dividing 32: the down-projections of 32 / r blocks run as one product with
# their block-diagonal weight (projected_forward.cpp, down_group). Block counts that are and are not
# multiples of the group, depths that end mid-step, ranks 2 to 16.
GROUPED_SHAPES = [(32, 8, 32), (16, 16, 20), (8, 4, 33), (12, 8, 16), (6, 8, 16), (16, 2, 40)]


@pytest.mark.parametrize("tokens", [17, 131])
@pytest.mark.parametrize("mixing", MIXINGS)
def test_grouped_down_projections(tokens: int, mixing: str) -> None:
    for k_in, rank, n_b in GROUPED_SHAPES:
        case = make_case((tokens,), 3, k_in, n_b, 5, rank, mixing, torch.bfloat16)
        scale = reference64(magnitude(case))
        label = f"{mixing} tokens={tokens} K_in={k_in} rank={rank} n_b={n_b}"
        assert_close_to(run(case), reference64(case), torch.bfloat16, label, scale)


@pytest.mark.parametrize(
    "value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"]
)
def test_grouped_down_projections_keep_non_finite_inputs_in_their_block(value: float) -> None:
    # In a block-diagonal product 0 * Inf is NaN: an Inf in block 0's features must still leave
    # the hidden of the group's other blocks as the reference has it (the tile is redone per block).
    # The token is redone alone, so the result does not depend on how threads tile the tokens.
    case = make_case((200,), 2, 8, 16, 4, 8, "diagonal", torch.bfloat16)
    case.x[101, 3] = value  # a token on AMX
    case.x[199, 40] = value  # past the last 16 tokens: the register tile (and the second group)
    threads = torch.get_num_threads()
    try:
        hidden = {}
        for count in (1, 2):
            torch.set_num_threads(count)
            hidden[count] = torch.ops.nanomoe.linear_forward(*case.args())[1]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(hidden[1].view(torch.int16), hidden[2].view(torch.int16))  # NaN included
    x, down = case.x.double(), case.down.double()
    expected = torch.einsum("tjn,jrn->tjr", x.view(200, 8, 16), down)
    assert torch.equal(hidden[1].isfinite(), expected.isfinite())
    finite = expected.isfinite()
    torch.testing.assert_close(hidden[1].double()[finite], expected[finite], rtol=1e-2, atol=1e-2)


# bfloat16 on AMX, a rank dividing 32 and at most 16 outputs a block: the up-projections of 32 / r
# blocks run as one product with their block-diagonal weight too (projected_forward.cpp, up_group).
# Groups of 2 to 32 blocks (ranks 16 to 1), outputs that leave a 16-column tile part empty; not
# grouped: 6 blocks at r = 8 (not a multiple of the group of 4) and 17 outputs.
GROUPED_UP_SHAPES = [
    (32, 8, 16),
    (16, 16, 5),
    (12, 8, 9),
    (6, 16, 16),
    (16, 2, 3),
    (32, 1, 4),
    (6, 8, 16),
    (4, 16, 17),
]


@pytest.mark.parametrize("tokens", [17, 131])
@pytest.mark.parametrize("mixing", MIXINGS)
def test_grouped_up_projections(tokens: int, mixing: str) -> None:
    for k_out, rank, m_b in GROUPED_UP_SHAPES:
        case = make_case((tokens,), k_out, 2, 8, m_b, rank, mixing, torch.bfloat16)
        scale = reference64(magnitude(case))
        label = f"{mixing} tokens={tokens} K_out={k_out} rank={rank} m_b={m_b}"
        assert_close_to(run(case), reference64(case), torch.bfloat16, label, scale)


def test_grouped_up_projections_keep_non_finite_mixed_in_its_block() -> None:
    # Output block 0's gate rows are huge, so one token's mixed overflows to Inf in block 0 only:
    # block 1, its partner in the block-diagonal product (r = 16), must still match the reference
    # (0 * Inf there would be NaN), and every other token every block. The token is redone alone,
    # whatever the tiling: the same bits on 1 and 2 threads.
    case = make_case((200,), 2, 2, 8, 16, 16, "diagonal", torch.bfloat16)
    case.mix[0] = 1e36
    case.x[101] *= 1000  # its hidden 1000x larger: mixed block 0 beyond bfloat16's range
    case.bias[16:] = 1e4  # the redone block's bias, which the partner's comparison must see
    threads = torch.get_num_threads()
    try:
        out = {}
        for count in (1, 2):
            torch.set_num_threads(count)
            out[count] = run(case)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[1].view(torch.int16), out[2].view(torch.int16))  # NaN included
    expected = reference64(case)
    scale = reference64(magnitude(case))
    others = torch.arange(200) != 101
    assert not out[1][101, :16].isfinite().all()
    partner = out[1][101, 16:], expected[101, 16:]
    assert_close_to(*partner, torch.bfloat16, "partner", scale[101, 16:])
    assert_close_to(out[1][others], expected[others], torch.bfloat16, "others", scale[others])


# bfloat16 on AMX, 16 blocks or more each way: the scalar gate is the tile unit's product of the
# (K_out, K_in) gate with the (K_in, tokens x rank) activations, 128 columns a chunk, 32 a product;
# the diagonal gate one product per rank position with the (K_in, tokens) activations, 32 tokens a
# product, rank positions transposed 16 at a time; diagonal_outer that plus its rank-one part, one
# product per source block for the dot products and one per destination block for their sums
# (gate_amx.cpp). Odd K_in (the last pair's partner is zero), K_out leaving a partial 16-row tile,
# odd ranks (the rank-one part pairs rank positions), ranks that straddle products, chunks and
# 16-lane transposes (3, 24, 40, 130), tokens few and many. float32 runs the same shapes on AVX-512.
AMX_GATE_SHAPES = [(16, 16, 1), (17, 33, 24), (40, 17, 3), (33, 20, 40), (16, 18, 130)]


@pytest.mark.parametrize("tokens", [1, 5, 17, 131])
@pytest.mark.parametrize("mixing", ["scalar", "diagonal", "diagonal_outer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gate_on_amx(tokens: int, mixing: str, dtype: torch.dtype) -> None:
    for k_out, k_in, rank in AMX_GATE_SHAPES:
        case = make_case((tokens,), k_out, k_in, 3, 2, rank, mixing, dtype)
        scale = reference64(magnitude(case))
        label = f"{mixing} {dtype} tokens={tokens} K=({k_out}, {k_in}) rank={rank}"
        assert_close_to(run(case), reference64(case), dtype, label, scale)


@pytest.mark.parametrize("mixing", ["scalar", "diagonal", "diagonal_outer"])
def test_gate_on_amx_keeps_non_finite_tokens_apart(mixing: str) -> None:
    # A product's 32 columns hold several tokens: a token's Inf must reach its own outputs only,
    # every other token's bits unchanged.
    case = make_case((40,), 16, 17, 3, 2, 5, mixing, torch.bfloat16)
    clean = run(case)
    case.x[7, 4] = float("inf")
    dirty = run(case)
    others = torch.arange(40) != 7
    assert torch.equal(clean[others], dirty[others])
    assert not dirty[7].isfinite().all()


@pytest.mark.parametrize("tokens", [17, 50, 131])
@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_down_projection_by_dot_products(tokens: int, mixing: str, dtype: torch.dtype) -> None:
    """Many tokens, a rank of 8 or less from blocks of 64 features or more: the down-projection
    takes dot products instead of the register tile (ranks and widths on both sides of the rule)."""
    for k_out, k_in, n_b, rank in [(2, 2, 64, 3), (3, 4, 70, 8), (2, 3, 64, 9), (2, 2, 63, 4)]:
        case = make_case((tokens,), k_out, k_in, n_b, 5, rank, mixing, dtype)
        scale = reference64(magnitude(case))
        label = f"{mixing} {dtype} tokens={tokens} n_b={n_b} rank={rank}"
        assert_close_to(run(case), reference64(case), dtype, label, scale)
