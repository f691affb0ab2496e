"""Parameter and multiply-add counts, and the rank for a budget (SPEC section 5)."""

import pytest

from nanomoe import budget
from nanomoe.budget import MIXINGS


def test_counts_follow_spec_table() -> None:
    n, m, r, k_out, k_in = 64, 48, 6, 4, 2
    base = r * (n + m)
    pairs = k_out * k_in
    assert budget.nanomoe_params(n, m, r, (k_out, k_in), "scalar", False) == base + pairs
    assert budget.nanomoe_params(n, m, r, (k_out, k_in), "diagonal", False) == base + pairs * r
    outer = budget.nanomoe_params(n, m, r, (k_out, k_in), "diagonal_outer", False)
    assert outer == base + 3 * pairs * r
    full = budget.nanomoe_params(n, m, r, (k_out, k_in), "full", True)
    assert full == base + pairs * r * r + m
    assert budget.nanomoe_macs(n, m, r, (k_out, k_in), "scalar") == base + pairs * r
    assert budget.nanomoe_macs(n, m, r, (k_out, k_in), "diagonal_outer") == base + 3 * pairs * r
    assert budget.nanomoe_macs(n, m, r, (k_out, k_in), "full") == base + pairs * r * r
    assert budget.lowrank_params(n, m, r) == base + m
    assert budget.lowrank_macs(n, m, r) == base
    assert budget.dense_params(n, m) == n * m + m
    assert budget.dense_macs(n, m) == n * m


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("metric", ["params", "macs"])
@pytest.mark.parametrize("fraction", [1 / 4, 1 / 8, 1 / 16])
def test_rank_for_budget_is_the_largest_that_fits(mixing, metric, fraction) -> None:
    n, m = 512, 256
    total = int(fraction * budget.dense_params(n, m))

    def cost(rank: int) -> int:
        if metric == "macs":
            return budget.nanomoe_macs(n, m, rank, 8, mixing)
        return budget.nanomoe_params(n, m, rank, 8, mixing)

    rank = budget.nanomoe_rank_for_budget(n, m, total, 8, mixing, metric=metric)
    assert cost(rank) <= total < cost(rank + 1)
    low = budget.lowrank_rank_for_budget(n, m, total, metric=metric)
    low_cost = budget.lowrank_macs if metric == "macs" else budget.lowrank_params
    assert low_cost(n, m, low) <= total < low_cost(n, m, low + 1)


def test_budget_too_small_is_an_error() -> None:
    with pytest.raises(ValueError, match="over the budget"):
        budget.nanomoe_rank_for_budget(64, 64, 100, 4, "full")
    with pytest.raises(ValueError, match="metric"):
        budget.lowrank_rank_for_budget(64, 64, 10_000, metric="flops")  # type: ignore[arg-type]


def test_feasible_configs_cover_every_block_pair() -> None:
    n, m = 12, 8
    total = 60
    configs = budget.feasible_configs(n, m, total, "diagonal")
    pairs = {c.num_blocks for c in configs}
    for k_out in (1, 2, 4, 8):
        for k_in in (1, 2, 3, 4, 6, 12):
            fits = budget.nanomoe_params(n, m, 1, (k_out, k_in), "diagonal") <= total
            assert ((k_out, k_in) in pairs) == fits
    for config in configs:
        assert config.params <= total
        assert config.params == budget.nanomoe_params(
            n, m, config.rank, config.num_blocks, "diagonal"
        )
        larger = budget.nanomoe_params(n, m, config.rank + 1, config.num_blocks, "diagonal")
        assert larger > total
