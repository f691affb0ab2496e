"""num_blocks="auto" and budgets given to NanoMoELinear (SPEC section 5)."""

import pytest
import torch

import nanomoe
from nanomoe import budget
from nanomoe.budget import MIXINGS


def _square_ranks(n: int, m: int, limit: int, mixing: str, metric: str) -> dict[int, int]:
    """K -> largest in-budget rank, for every square K dividing both sizes that fits at all."""
    ranks = {}
    for k in range(1, min(n, m) + 1):
        if n % k or m % k:
            continue
        try:
            ranks[k] = budget.nanomoe_rank_for_budget(n, m, limit, k, mixing, metric=metric)
        except ValueError:
            pass
    return ranks


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("metric", ["params", "macs"])
@pytest.mark.parametrize("shape", [(128, 512), (96, 96), (1024, 256), (60, 90)])
@pytest.mark.parametrize("fraction", [1 / 4, 1 / 8, 1 / 32])
def test_auto_config_is_the_largest_block_count_with_room(mixing, metric, shape, fraction) -> None:
    n, m = shape
    limit = budget.absolute_budget(n, m, fraction, metric=metric)
    ranks = _square_ranks(n, m, limit, mixing, metric)
    if not ranks:
        with pytest.raises(ValueError, match="fits"):
            budget.auto_config(n, m, fraction, mixing, metric=metric)
        return
    config = budget.auto_config(n, m, fraction, mixing, metric=metric)
    k = config.num_blocks[0]
    assert config.num_blocks == (k, k) and config.rank == ranks[k]
    floor = max(budget.AUTO_MIN_RANK, budget.AUTO_RANK_FRACTION * ranks[1])
    roomy = [kk for kk, rank in ranks.items() if rank >= floor]
    assert k == max(roomy, default=1)
    cost = config.macs if metric == "macs" else config.params
    assert cost <= limit


def test_min_rank_moves_the_choice() -> None:
    wide = budget.auto_config(512, 512, 1 / 8, "scalar", min_rank=1, rank_fraction=0.1)
    narrow = budget.auto_config(512, 512, 1 / 8, "scalar", min_rank=16, rank_fraction=0.1)
    assert wide.num_blocks[0] > narrow.num_blocks[0] and narrow.rank >= 16
    keep_all = budget.auto_config(512, 512, 1 / 8, "scalar", rank_fraction=1.0)
    assert keep_all.rank == budget.nanomoe_rank_for_budget(512, 512, 32832, 1, "scalar")
    with pytest.raises(ValueError, match="min_rank"):
        budget.auto_config(512, 512, 1 / 8, min_rank=0)
    with pytest.raises(ValueError, match="rank_fraction"):
        budget.auto_config(512, 512, 1 / 8, rank_fraction=1.5)


def test_absolute_budget() -> None:
    assert budget.absolute_budget(100, 50, 1000) == 1000
    assert budget.absolute_budget(100, 50, 0.5) == (100 * 50 + 50) // 2
    assert budget.absolute_budget(100, 50, 0.5, bias=False, metric="macs") == 2500
    for bad in (0.0, 1.5, -3, 0, True, "1/8"):
        with pytest.raises(ValueError, match="budget"):
            budget.absolute_budget(100, 50, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("mixing", MIXINGS)
def test_layer_from_a_budget(mixing: str) -> None:
    n, m = 256, 128
    auto = nanomoe.NanoMoELinear(n, m, num_blocks="auto", budget=1 / 8, mixing=mixing)
    expected = budget.auto_config(n, m, 1 / 8, mixing)
    assert (auto.rank, auto.num_blocks) == (expected.rank, expected.num_blocks)
    assert sum(p.numel() for p in auto.parameters()) == expected.params
    fixed = nanomoe.NanoMoELinear(n, m, num_blocks=4, mixing=mixing, budget=5000)
    assert fixed.rank == budget.nanomoe_rank_for_budget(n, m, 5000, 4, mixing)
    by_macs = nanomoe.NanoMoELinear(n, m, num_blocks=(2, 8), budget=0.1, budget_metric="macs")
    assert budget.nanomoe_macs(n, m, by_macs.rank, (2, 8)) <= 0.1 * n * m
    assert auto(torch.randn(3, n)).shape == (3, m)


def test_layer_size_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="either rank"):
        nanomoe.NanoMoELinear(64, 64, 8, num_blocks="auto", budget=0.5)
    with pytest.raises(ValueError, match="either rank"):
        nanomoe.NanoMoELinear(64, 64, 8, budget=0.5)
    with pytest.raises(ValueError, match="needs a rank"):
        nanomoe.NanoMoELinear(64, 64, num_blocks="auto")
    with pytest.raises(ValueError, match="'auto'"):
        nanomoe.NanoMoELinear(64, 64, 8, num_blocks="many")
    with pytest.raises(ValueError, match="'auto'"):
        nanomoe.NanoMoELinear(64, 64, num_blocks="many", budget=0.5)
