"""The routed mixture-of-experts baseline: routing, weighting, load balancing, counts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanomoe.compare.moe import (
    BALANCE_WEIGHT,
    RoutedMoE,
    balance_loss,
    moe_hidden_for_budget,
    moe_macs,
    moe_params,
)


def token_by_token(layer: RoutedMoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's definition written one token at a time, sorting the router's scores itself."""
    rows = []
    for token in x.reshape(-1, layer.in_features):
        probs = (layer.router @ token).softmax(0)
        order = sorted(range(layer.experts), key=lambda e: -probs[e].item())[: layer.top_k]
        total = sum(probs[e] for e in order) if layer.top_k > 1 else 1.0
        out = torch.zeros(layer.out_features, dtype=x.dtype)
        for e in order:
            inner = layer.first[e] @ token
            if layer.hidden_bias is not None:
                inner = inner + layer.hidden_bias[e]
            out = out + probs[e] / total * (layer.second[e] @ F.gelu(inner))
        rows.append(out if layer.bias is None else out + layer.bias)
    return torch.stack(rows).reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("experts,top_k", [(1, 1), (4, 1), (4, 2), (5, 3), (3, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_the_definition(experts: int, top_k: int, bias: bool) -> None:
    torch.manual_seed(experts * 10 + top_k)
    layer = RoutedMoE(12, 7, experts, 5, top_k, bias, dtype=torch.float64)
    with torch.no_grad():  # a router with real preferences, not the near-uniform initial one
        layer.router.normal_()
    x = torch.randn(4, 9, 12, dtype=torch.float64).transpose(0, 1)  # not contiguous
    torch.testing.assert_close(layer(x), token_by_token(layer, x))


def test_empty_batch_and_wrong_width() -> None:
    layer = RoutedMoE(12, 7, 4, 5)
    assert layer(torch.empty(0, 3, 12)).shape == (0, 3, 7)
    with pytest.raises(ValueError, match="expected input with 12 features"):
        layer(torch.randn(2, 11))


def test_gradients_reach_every_part() -> None:
    torch.manual_seed(0)
    layer = RoutedMoE(6, 5, 3, 4, 2, dtype=torch.float64)
    with torch.no_grad():
        layer.router.normal_()
    x = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    (layer(x).square().sum() + balance_loss(layer)).backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_top1_router_learns_through_the_weight() -> None:
    """With one expert per token, Switch scales the output by the router probability so the router
    still gets a gradient from the task loss alone."""
    layer = RoutedMoE(6, 5, 3, 4, 1)
    layer(torch.randn(8, 6)).sum().backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0


def test_balance_loss_is_switch_loss() -> None:
    torch.manual_seed(1)
    layer = RoutedMoE(6, 5, 4, 3, 2)
    with torch.no_grad():
        layer.router.normal_()
    x = torch.randn(32, 6)
    layer(x)
    probs = (x @ layer.router.T).softmax(-1)
    chosen = probs.topk(2, dim=-1).indices
    share = torch.stack([(chosen == e).float().sum() / chosen.numel() for e in range(4)])
    expected = 4 * (share * probs.mean(0)).sum()
    assert layer.pending_balance is not None
    torch.testing.assert_close(layer.pending_balance, expected)
    model = nn.Sequential(layer, nn.GELU(), RoutedMoE(5, 6, 2, 3, 1))
    model(x)
    second = model[2].pending_balance
    assert second is not None and layer.pending_balance is not None
    total = BALANCE_WEIGHT * (layer.pending_balance + second)
    torch.testing.assert_close(balance_loss(model), total)
    # taken once: a second call, or a model without routed layers, adds nothing
    assert balance_loss(model).item() == 0 and balance_loss(nn.Linear(3, 3)).item() == 0


def test_balance_loss_is_least_when_routing_is_balanced() -> None:
    """Half the tokens to each of two experts gives 1 (its minimum); all to one expert gives
    2 P_0 > 1 whenever the router prefers that expert."""
    layer = RoutedMoE(2, 3, 2, 3, 1)
    with torch.no_grad():
        layer.router.copy_(torch.tensor([[3.0, 0.0], [-3.0, 0.0]]))  # expert 0 iff x_0 > 0
    balanced = torch.tensor([[1.0, 0.5], [2.0, -1.0], [-1.0, 0.3], [-0.5, 2.0]])
    layer(balanced)
    assert layer.pending_balance is not None
    assert layer.pending_balance.item() == pytest.approx(1.0)
    layer(balanced.abs())  # every token to expert 0
    probs = (balanced.abs() @ layer.router.T).softmax(-1)
    assert layer.pending_balance is not None
    assert layer.pending_balance.item() == pytest.approx(2 * probs[:, 0].mean().item())
    assert layer.pending_balance.item() > 1.5


def test_eval_forward_leaves_no_balance_loss() -> None:
    """An eval forward must not leave the last training step's loss (and its graph) behind."""
    layer = RoutedMoE(6, 5, 4, 3, 1)
    layer(torch.randn(10, 6))
    layer.eval()
    layer(torch.randn(10, 6))
    assert layer.pending_balance is None and balance_loss(layer).item() == 0


@pytest.mark.parametrize("bias", [True, False])
def test_counts(bias: bool) -> None:
    layer = RoutedMoE(12, 7, 4, 5, 2, bias)
    assert moe_params(12, 7, 4, 5, 2, bias) == sum(p.numel() for p in layer.parameters())
    assert moe_macs(12, 7, 4, 5, 2) == 12 * 4 + 2 * 5 * (12 + 7)


@pytest.mark.parametrize("metric", ["params", "macs"])
def test_hidden_for_budget_is_the_largest_that_fits(metric: str) -> None:
    def cost(hidden: int) -> int:
        if metric == "macs":
            return moe_macs(64, 96, 4, hidden, 2)
        return moe_params(64, 96, 4, hidden, 2)

    hidden = moe_hidden_for_budget(64, 96, 3000, 4, 2, True, metric)  # type: ignore[arg-type]
    assert cost(hidden) <= 3000 < cost(hidden + 1)


@pytest.mark.parametrize(
    "args,message",
    [
        ((0, 4, 2, 3, 1), "features must be >= 1"),
        ((4, 4, 0, 3, 1), "experts and hidden must be >= 1"),
        ((4, 4, 2, 0, 1), "experts and hidden must be >= 1"),
        ((4, 4, 2, 3, 3), r"top_k must be in \[1, experts=2\]"),
        ((4, 4, 2, 3, 0), r"top_k must be in \[1, experts=2\]"),
    ],
)
def test_rejects_bad_configurations(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RoutedMoE(*args)
    with pytest.raises(ValueError, match=message):
        moe_params(*args)
