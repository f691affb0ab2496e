"""The comparison's layers: Monarch, and every kind sized to its budget by ``layer_factory``."""

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import nanomoe
from nanomoe.compare.layers import (
    LAYER_KINDS,
    Monarch,
    describe_layer,
    layer_factory,
    monarch_macs,
    monarch_params,
)
from nanomoe.compare.moe import RoutedMoE, moe_params

# Square, non-square both ways, a pair NanoMoE's K=8 and Monarch's 4 blocks do not divide (K falls
# back to 5 and 2), and a prime in_features (both fall back to 1).
SIZES = [(128, 128), (192, 80), (80, 192), (150, 250), (97, 64)]
BUDGETS = [1 / 4, 1 / 8, 1 / 16]


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measured_macs(module: nn.Module, features: int) -> int:
    """Multiply-adds per token as PyTorch's flop counter sees one token go through the layer."""
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(1, features))
    return counter.get_total_flops() // 2


def next_size_up(module: nn.Module) -> nn.Module:
    """The same layer one step of granularity larger: rank + 1, width + blocks, or hidden + 1."""
    bias = module.bias is not None
    n, m = module.in_features, module.out_features
    if isinstance(module, nanomoe.LowRankLinear):
        return nanomoe.LowRankLinear(n, m, module.rank + 1, bias)
    if isinstance(module, nanomoe.NanoMoELinear):
        return nanomoe.NanoMoELinear(n, m, module.rank + 1, module.num_blocks, module.mixing, bias)
    if isinstance(module, RoutedMoE):
        return RoutedMoE(n, m, module.experts, module.hidden + 1, module.top_k, bias)
    assert isinstance(module, Monarch)
    return Monarch(n, m, module.blocks, module.width + module.blocks, bias)


def cost(module: nn.Module, budget_kind: str) -> int:
    """Real parameter count, or MACs per token (counted by the helpers; cross-checked below)."""
    return numel(module) if budget_kind == "params" else describe_layer(module)["macs"]


@pytest.mark.parametrize("kind", LAYER_KINDS[1:])
@pytest.mark.parametrize("budget_kind", ["params", "flops"])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bias", [True, False])
def test_layers_fill_their_budget(kind, budget_kind, budget, size, bias) -> None:
    n, m = size
    dense = nn.Linear(n, m, bias)
    limit = budget * (numel(dense) if budget_kind == "params" else n * m)
    if kind == "moe" and budget_kind == "params" and moe_params(n, m, 2, 1, 1, bias) > limit:
        with pytest.raises(ValueError, match="over the budget"):  # even hidden width 1
            layer_factory(kind, budget, budget_kind, moe_experts=2)(n, m, bias)
        return
    layer = layer_factory(kind, budget, budget_kind, moe_experts=2)(n, m, bias)
    assert cost(layer, budget_kind) <= limit
    assert cost(next_size_up(layer), budget_kind) > limit
    assert describe_layer(layer)["kind"] == kind
    assert layer(torch.randn(3, n)).shape == (3, m)


@pytest.mark.parametrize("budget_kind", ["params", "flops"])
def test_dense_ignores_the_budget(budget_kind) -> None:
    layer = layer_factory("dense", 1 / 16, budget_kind)(30, 20, False)
    assert type(layer) is nn.Linear and layer.bias is None
    assert describe_layer(layer) == {"kind": "dense", "params": 600, "macs": 600}


def test_block_counts_fall_back_to_common_divisors() -> None:
    assert describe_layer(layer_factory("nanomoe-diagonal")(128, 64, True))["num_blocks"] == 8
    assert describe_layer(layer_factory("nanomoe-diagonal")(150, 250, True))["num_blocks"] == 5
    assert describe_layer(layer_factory("nanomoe-scalar")(97, 64, True))["num_blocks"] == 1
    assert describe_layer(layer_factory("monarch")(96, 64, True))["blocks"] == 4
    assert describe_layer(layer_factory("monarch", monarch_blocks=8)(36, 60, True))["blocks"] == 6
    assert describe_layer(layer_factory("monarch")(150, 250, True))["blocks"] == 2


def test_flops_and_params_budgets_differ_where_the_gate_costs_differ() -> None:
    # The parameter budget also pays for the bias and the MAC budget does not: at 150x250, 1/8
    # (K=5) that is the difference between rank 10 and rank 11.
    params = describe_layer(layer_factory("nanomoe-diagonal", 1 / 8, "params")(150, 250, True))
    flops = describe_layer(layer_factory("nanomoe-diagonal", 1 / 8, "flops")(150, 250, True))
    assert (params["rank"], flops["rank"]) == (10, 11)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_describe_layer_counts_match_the_module(kind) -> None:
    layer = layer_factory(kind, 1 / 4)(96, 64, True)
    info = describe_layer(layer)
    assert info["params"] == numel(layer)
    if not kind.startswith("nanomoe"):  # the flop counter cannot see inside the custom operator
        assert info["macs"] == measured_macs(layer, 96)


def test_describe_layer_reports_the_configuration() -> None:
    info = describe_layer(nanomoe.NanoMoELinear(48, 32, 11, 8, "diagonal"))
    assert {k: info[k] for k in ("kind", "rank", "num_blocks", "mixing")} == {
        "kind": "nanomoe-diagonal",
        "rank": 11,
        "num_blocks": 8,
        "mixing": "diagonal",
    }
    assert describe_layer(nanomoe.NanoMoELinear(48, 32, 3, (4, 6)))["num_blocks"] == (4, 6)
    assert describe_layer(nanomoe.LowRankLinear(48, 32, 5))["rank"] == 5
    info = describe_layer(Monarch(48, 32, 4, 24))
    assert (info["blocks"], info["width"]) == (4, 24)
    with pytest.raises(TypeError, match="Conv1d"):
        describe_layer(nn.Conv1d(3, 3, 1))


def test_monarch_counts() -> None:
    layer = Monarch(48, 32, 4, 24, bias=True)
    assert layer.left.shape == (4, 6, 12) and layer.right.shape == (4, 8, 6)
    assert monarch_params(48, 32, 4, 24) == numel(layer) == 24 * 80 // 4 + 32
    assert monarch_params(48, 32, 4, 24, bias=False) == numel(Monarch(48, 32, 4, 24, False))
    assert monarch_macs(48, 32, 4, 24) == measured_macs(layer, 48) == 24 * 80 // 4


@pytest.mark.parametrize("blocks,width", [(4, 32), (4, 8), (3, 9), (1, 5)])
def test_monarch_forward_is_its_dense_weight(blocks, width) -> None:
    layer = Monarch(24, 36, blocks, width, dtype=torch.float64)
    x = torch.randn(2, 5, 24, dtype=torch.float64).transpose(0, 1)  # leading dims, not contiguous
    assert layer.bias is not None
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    assert layer(torch.empty(0, 24, dtype=torch.float64)).shape == (0, 36)


def test_monarch_dense_weight_follows_the_stride_permutation() -> None:
    # blocks=2, one middle entry per block and output: W[o, i] = right[o // 2] . left[., i] through
    # the interleaving, written out by hand so that to_dense cannot agree with a wrong forward.
    layer = Monarch(4, 4, 2, 4, bias=False, dtype=torch.float64)
    left, right = layer.left.detach(), layer.right.detach()
    middle = torch.zeros(4, 4, dtype=torch.float64)  # rows: middle entries in block order
    middle[0:2, 0:2], middle[2:4, 2:4] = left[0], left[1]
    interleaved = middle[[0, 2, 1, 3]]  # (block 0, entry 0), (block 1, entry 0), ...
    expected = torch.block_diag(right[0], right[1]) @ interleaved
    torch.testing.assert_close(layer.to_dense(), expected)
    torch.testing.assert_close(layer(torch.eye(4, dtype=torch.float64)).T, expected)


def test_monarch_connectivity() -> None:
    """width/blocks >= blocks: every block of the dense weight is nonzero; below, some are zero."""

    def nonzero_blocks(layer: Monarch) -> torch.Tensor:
        k = layer.blocks
        weight = layer.to_dense().detach().reshape(k, 32 // k, k, 32 // k)
        return weight.abs().sum(dim=(1, 3)) > 0

    assert nonzero_blocks(Monarch(32, 32, 4, 16)).all()
    sparse = nonzero_blocks(Monarch(32, 32, 8, 16))  # 2 middle entries per block < 8 blocks
    assert (sparse.sum(dim=1) == 2).all()


def test_monarch_gradients_flow() -> None:
    layer = Monarch(12, 8, 2, 6, dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    layer(x).square().sum().backward()
    for parameter in layer.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


@pytest.mark.parametrize("blocks,width", [(4, 256), (4, 8), (8, 40), (1, 64)])
def test_monarch_init_matches_nn_linear_variance(blocks, width) -> None:
    torch.manual_seed(0)
    n, m = 512, 384
    second_moments = [
        Monarch(n, m, blocks, width).to_dense().detach().square().mean() for _ in range(8)
    ]
    variance = torch.stack(second_moments).mean().item()
    assert variance == pytest.approx(1 / (3 * n), rel=0.1)
    bias = Monarch(n, m, blocks, width).bias
    assert bias is not None and bias.abs().max() <= 1 / math.sqrt(n)


@pytest.mark.parametrize(
    "args,message",
    [
        ((30, 32, 4, 16), "blocks=4 do not divide in_features=30"),
        ((32, 30, 4, 16), "blocks=4 do not divide out_features=30"),
        ((32, 32, 4, 18), "blocks=4 do not divide width=18"),
        ((32, 32, 0, 16), "must be >= 1"),
        ((32, 32, 4, 0), "must be >= 1"),
    ],
)
def test_monarch_rejects_bad_sizes(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        Monarch(*args)
    with pytest.raises(ValueError, match=message):
        monarch_params(*args)


def test_monarch_rejects_wrong_input_width() -> None:
    with pytest.raises(ValueError, match="expected input with 32 features"):
        Monarch(32, 32, 4, 16)(torch.randn(2, 31))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kind": "butterfly"}, "unknown layer kind 'butterfly'"),
        ({"kind": "lowrank", "budget_kind": "bytes"}, "budget_kind must be"),
        ({"kind": "lowrank", "budget": 0}, "budget must be a positive"),
        ({"kind": "nanomoe-full", "num_blocks": 0}, "block and expert counts must be >= 1"),
        ({"kind": "moe", "moe_experts": 0}, "block and expert counts must be >= 1"),
    ],
)
def test_factory_rejects_bad_options(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        layer_factory(**kwargs)


@pytest.mark.parametrize("kind", ["lowrank", "monarch", "moe", "nanomoe-full"])
def test_factory_says_when_nothing_fits(kind) -> None:
    make = layer_factory(kind, 1 / 64)
    with pytest.raises(ValueError, match=rf"{kind} for a 8->8 layer at 0.015625 .*over the budget"):
        make(8, 8, True)


def test_moe_factory_routes_top_k_of_its_experts() -> None:
    info = describe_layer(layer_factory("moe", 1 / 4, "flops", moe_experts=4)(128, 512, True))
    assert (info["kind"], info["experts"], info["top_k"]) == ("moe", 4, 1)  # Switch routing
    # the multiply-add budget pays for the experts a token visits, not for all of them
    params = describe_layer(layer_factory("moe", 1 / 4, "params", moe_experts=4)(128, 512, True))
    assert info["hidden"] > params["hidden"]
