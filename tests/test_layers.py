"""NanoMoELinear and LowRankLinear: parameters, initialization, equivalent weight, rank."""

import pytest
import torch
from torch import nn

import nanomoe
from nanomoe import budget
from nanomoe.budget import MIXINGS
from nanomoe.reference import dense_weight_reference


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_matches_budget(mixing: str, bias: bool) -> None:
    layer = nanomoe.NanoMoELinear(24, 18, 5, (3, 4), mixing, bias)
    count = sum(p.numel() for p in layer.parameters())
    assert count == budget.nanomoe_params(24, 18, 5, (3, 4), mixing, bias)
    lowrank = nanomoe.LowRankLinear(24, 18, 5, bias)
    assert sum(p.numel() for p in lowrank.parameters()) == budget.lowrank_params(24, 18, 5, bias)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_shapes_follow_spec(mixing: str) -> None:
    layer = nanomoe.NanoMoELinear(12, 10, 3, (5, 4), mixing, dtype=torch.float64)
    assert layer.down.shape == (4, 3, 3)
    assert layer.up.shape == (5, 2, 3)
    assert layer.mix.shape == budget.gate_shapes(mixing, 5, 4, 3)[0]
    assert (layer.mix_left is not None) == (mixing == "diagonal_outer")
    assert layer.down.dtype == torch.float64
    assert "mixing=" in repr(layer)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_to_dense_is_the_layer(mixing: str) -> None:
    layer = nanomoe.NanoMoELinear(12, 10, 3, (5, 4), mixing, dtype=torch.float64)
    weight = layer.to_dense()
    gate = [layer.mix_left, layer.mix_right]
    torch.testing.assert_close(
        weight, dense_weight_reference(layer.down, layer.mix, layer.up, *gate)
    )
    x = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, weight, layer.bias))


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize(("in_features", "rank", "blocks"), [(256, 4, 4), (64, 16, (2, 8))])
def test_initial_weight_has_linear_variance(mixing, in_features, rank, blocks) -> None:
    torch.manual_seed(0)
    weights = [
        nanomoe.NanoMoELinear(in_features, 64, rank, blocks, mixing, dtype=torch.float64)
        .to_dense()
        .detach()
        for _ in range(30)
    ]
    variance = torch.stack(weights).var().item()
    target = 1.0 / (3 * in_features)  # nn.Linear's default
    assert abs(variance / target - 1) < 0.1, f"variance {variance:.3g} vs {target:.3g}"
    bias = nanomoe.NanoMoELinear(in_features, 64, rank, blocks, mixing).bias
    assert bias is not None and bias.abs().max() <= in_features**-0.5


def test_lowrank_weight_variance_and_dense() -> None:
    torch.manual_seed(0)
    layers = [nanomoe.LowRankLinear(128, 64, 8, dtype=torch.float64) for _ in range(30)]
    variance = torch.stack([layer.to_dense().detach() for layer in layers]).var().item()
    assert abs(variance * 3 * 128 - 1) < 0.1
    x = torch.randn(5, 128, dtype=torch.float64)
    layer = layers[0]
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.to_dense(), layer.bias))


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize(("blocks", "rank"), [(4, 3), ((2, 6), 5), ((6, 3), 4)])
def test_rank_is_rank_times_blocks(mixing, blocks, rank) -> None:
    # SPEC section 2: random factors reach rank r * min(K_out, K_in) (block widths >= r here).
    torch.manual_seed(1)
    layer = nanomoe.NanoMoELinear(48, 36, rank, blocks, mixing, dtype=torch.float64)
    k_out, k_in = layer.num_blocks
    expected = min(36, 48, rank * min(k_out, k_in))
    assert torch.linalg.matrix_rank(layer.to_dense()).item() == expected
    lowrank = nanomoe.LowRankLinear(48, 36, rank, dtype=torch.float64)
    assert torch.linalg.matrix_rank(lowrank.to_dense()).item() == rank


def test_one_block_scalar_is_lowrank() -> None:
    layer = nanomoe.NanoMoELinear(20, 12, 3, 1, "scalar", dtype=torch.float64)
    lowrank = nanomoe.LowRankLinear(20, 12, 3, dtype=torch.float64)
    with torch.no_grad():
        lowrank.down.copy_(layer.down[0] * layer.mix[0, 0])
        lowrank.up.copy_(layer.up[0])
        lowrank.bias.copy_(layer.bias)
    x = torch.randn(6, 20, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lowrank(x))


def test_trains() -> None:
    # A few steps of Adam on a regression target reduce the loss (gradients flow to every tensor).
    torch.manual_seed(0)
    layer = nanomoe.NanoMoELinear(32, 16, 4, 4, "diagonal_outer")
    target = nn.Linear(32, 16)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 32)
    losses = []
    for _ in range(50):
        loss = (layer(x) - target(x).detach()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
