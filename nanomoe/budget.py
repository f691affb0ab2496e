"""Parameter and multiply-add counts, and the largest rank that fits a budget (SPEC section 5).

Counts are exact and per layer; multiply-adds are per token. Every compressed layer the library
offers (NanoMoE in each variant, low-rank) is counted here, next to dense ``nn.Linear``, so
comparisons "at the same parameter or FLOP budget" use one source of truth.
"""

from dataclasses import dataclass
from typing import Callable, Literal, Tuple, Union

Mixing = Literal["scalar", "diagonal", "diagonal_outer", "full"]
MIXINGS: Tuple[Mixing, ...] = ("scalar", "diagonal", "diagonal_outer", "full")
BlockCount = Union[int, Tuple[int, int]]
Metric = Literal["params", "macs"]


def block_pair(num_blocks: BlockCount) -> Tuple[int, int]:
    """``(K_out, K_in)`` from an int ``K`` (both) or a pair."""
    if isinstance(num_blocks, int):
        pair = (num_blocks, num_blocks)
    elif (
        isinstance(num_blocks, tuple)
        and len(num_blocks) == 2
        and all(isinstance(k, int) for k in num_blocks)
    ):
        pair = (num_blocks[0], num_blocks[1])
    else:
        raise ValueError(f"num_blocks must be an int or a pair (K_out, K_in), got {num_blocks!r}")
    if min(pair) < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks!r}")
    return pair


def check_layer(
    in_features: int, out_features: int, rank: int, num_blocks: BlockCount, mixing: str
) -> Tuple[int, int]:
    """Validate a NanoMoE configuration; returns ``(K_out, K_in)``. Raises ``ValueError``."""
    if mixing not in MIXINGS:
        raise ValueError(f"unknown mixing {mixing!r}; choose one of {', '.join(MIXINGS)}")
    if in_features < 1 or out_features < 1:
        raise ValueError(f"features must be >= 1, got in={in_features}, out={out_features}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    k_out, k_in = block_pair(num_blocks)
    if in_features % k_in:
        raise ValueError(f"K_in={k_in} blocks do not divide in_features={in_features}")
    if out_features % k_out:
        raise ValueError(f"K_out={k_out} blocks do not divide out_features={out_features}")
    return k_out, k_in


def gate_shapes(mixing: Mixing, k_out: int, k_in: int, rank: int) -> Tuple[Tuple[int, ...], ...]:
    """Shapes of the gate tensors ``mix`` (and ``mix_left``, ``mix_right``) of a variant."""
    if mixing == "scalar":
        return ((k_out, k_in),)
    if mixing == "diagonal":
        return ((k_out, k_in, rank),)
    if mixing == "diagonal_outer":
        return ((k_out, k_in, rank),) * 3
    return ((k_out, k_in, rank, rank),)


def nanomoe_params(
    in_features: int,
    out_features: int,
    rank: int,
    num_blocks: BlockCount = 4,
    mixing: Mixing = "scalar",
    bias: bool = True,
) -> int:
    """Parameters of ``NanoMoELinear``: ``rank * (in + out)``, the gate tensors, and the bias."""
    k_out, k_in = check_layer(in_features, out_features, rank, num_blocks, mixing)
    gate = 0
    for shape in gate_shapes(mixing, k_out, k_in, rank):
        size = 1
        for dim in shape:
            size *= dim
        gate += size
    return rank * (in_features + out_features) + gate + (out_features if bias else 0)


def nanomoe_macs(
    in_features: int,
    out_features: int,
    rank: int,
    num_blocks: BlockCount = 4,
    mixing: Mixing = "scalar",
) -> int:
    """Multiply-adds per token: the projections, ``rank * (in + out)``, plus the mixing."""
    k_out, k_in = check_layer(in_features, out_features, rank, num_blocks, mixing)
    per_pair = {"scalar": rank, "diagonal": rank, "diagonal_outer": 3 * rank, "full": rank * rank}
    return rank * (in_features + out_features) + k_out * k_in * per_pair[mixing]


def lowrank_params(in_features: int, out_features: int, rank: int, bias: bool = True) -> int:
    """Parameters of ``LowRankLinear``: ``rank * (in + out)`` plus the bias."""
    return lowrank_macs(in_features, out_features, rank) + (out_features if bias else 0)


def lowrank_macs(in_features: int, out_features: int, rank: int) -> int:
    """Multiply-adds per token of ``LowRankLinear``."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return rank * (in_features + out_features)


def dense_params(in_features: int, out_features: int, bias: bool = True) -> int:
    """Parameters of ``nn.Linear``."""
    return in_features * out_features + (out_features if bias else 0)


def dense_macs(in_features: int, out_features: int) -> int:
    """Multiply-adds per token of ``nn.Linear``."""
    return in_features * out_features


def largest_rank(cost: Callable[[int], int], budget: int, what: str) -> int:
    """Largest ``rank >= 1`` with ``cost(rank) <= budget``; ``cost`` grows with rank."""
    if cost(1) > budget:
        raise ValueError(f"{what}: even rank 1 costs {cost(1)}, over the budget of {budget}")
    low, high = 1, 2
    while cost(high) <= budget:
        low, high = high, high * 2
    while high - low > 1:  # cost(low) fits, cost(high) does not
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) <= budget else (low, middle)
    return low


def nanomoe_rank_for_budget(
    in_features: int,
    out_features: int,
    budget: int,
    num_blocks: BlockCount = 4,
    mixing: Mixing = "scalar",
    bias: bool = True,
    metric: Metric = "params",
) -> int:
    """Largest NanoMoE rank whose parameters (or multiply-adds per token) stay within ``budget``."""

    def cost(rank: int) -> int:
        if metric == "macs":
            return nanomoe_macs(in_features, out_features, rank, num_blocks, mixing)
        return nanomoe_params(in_features, out_features, rank, num_blocks, mixing, bias)

    check_metric(metric)
    return largest_rank(cost, budget, f"NanoMoE {mixing} with {num_blocks} blocks")


def lowrank_rank_for_budget(
    in_features: int,
    out_features: int,
    budget: int,
    bias: bool = True,
    metric: Metric = "params",
) -> int:
    """Largest low-rank rank whose parameters (or multiply-adds per token) fit ``budget``."""

    def cost(rank: int) -> int:
        if metric == "macs":
            return lowrank_macs(in_features, out_features, rank)
        return lowrank_params(in_features, out_features, rank, bias)

    check_metric(metric)
    return largest_rank(cost, budget, "low-rank")


@dataclass(frozen=True)
class Config:
    """One NanoMoE configuration and what it costs."""

    num_blocks: Tuple[int, int]  # (K_out, K_in)
    rank: int
    params: int
    macs: int


def feasible_configs(
    in_features: int,
    out_features: int,
    budget: int,
    mixing: Mixing = "scalar",
    bias: bool = True,
    metric: Metric = "params",
) -> list[Config]:
    """Every block pair ``(K_out, K_in)`` that divides the layer, with the largest rank in budget.

    A smaller rank at the same block counts is feasible too but never more expressive, so each pair
    appears once, at its largest rank. Pairs where even rank 1 is over budget are left out.
    Sorted by ``(K_out, K_in)``.
    """
    check_metric(metric)
    configs = []
    for k_out in _divisors(out_features):
        for k_in in _divisors(in_features):
            try:
                rank = nanomoe_rank_for_budget(
                    in_features, out_features, budget, (k_out, k_in), mixing, bias, metric
                )
            except ValueError:
                continue
            configs.append(
                Config(
                    num_blocks=(k_out, k_in),
                    rank=rank,
                    params=nanomoe_params(
                        in_features, out_features, rank, (k_out, k_in), mixing, bias
                    ),
                    macs=nanomoe_macs(in_features, out_features, rank, (k_out, k_in), mixing),
                )
            )
    return configs


def _divisors(value: int) -> list[int]:
    return [k for k in range(1, value + 1) if value % k == 0]


def check_metric(metric: str) -> None:
    """Raise ``ValueError`` unless ``metric`` is ``"params"`` or ``"macs"``."""
    if metric not in ("params", "macs"):
        raise ValueError(f"metric must be 'params' or 'macs', got {metric!r}")


# num_blocks="auto" takes the largest square block count whose in-budget rank keeps at least
# AUTO_RANK_FRACTION of the rank at K = 1 (the gate's parameters eat the rest) and at least
# AUTO_MIN_RANK; see auto_config for the measurements behind both.
AUTO_RANK_FRACTION = 0.9
AUTO_MIN_RANK = 4

# A budget given as a float in (0, 1] is a fraction of the nn.Linear's cost; an int is absolute.
Budget = Union[int, float]


def absolute_budget(
    in_features: int,
    out_features: int,
    budget: Budget,
    bias: bool = True,
    metric: Metric = "params",
) -> int:
    """``budget`` in parameters (or multiply-adds per token): an int as it is, a float in
    ``(0, 1]`` as that fraction of the ``nn.Linear`` of the same shape (its bias counted)."""
    check_metric(metric)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be an int (a count) or a float in (0, 1], got {budget!r}")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(
                f"a float budget is a fraction of nn.Linear's cost in (0, 1], got {budget}"
            )
        dense = (
            dense_macs(in_features, out_features)
            if metric == "macs"
            else dense_params(in_features, out_features, bias)
        )
        return int(budget * dense)
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    return budget


def auto_config(
    in_features: int,
    out_features: int,
    budget: Budget,
    mixing: Mixing = "scalar",
    bias: bool = True,
    metric: Metric = "params",
    min_rank: int = AUTO_MIN_RANK,
    rank_fraction: float = AUTO_RANK_FRACTION,
) -> Config:
    """The configuration ``num_blocks="auto"`` picks: among square block counts ``K = K_out = K_in``
    that divide both feature counts, the largest whose in-budget rank is at least ``rank_fraction``
    of the rank at ``K = 1`` and at least ``min_rank``; if none qualifies, ``K = 1``.

    Why (``benchmarks/block_count.py``; README, "Choosing the block count"): at a fixed budget a
    larger ``K`` raises the attainable rank of the weight (``K r``) but its gate takes parameters
    from ``r``. Where the target needs a high rank (a teacher with a flat spectrum), test error
    keeps falling up to ``K = 64`` for scalar mixing (0.83 at ``K = 1`` to 0.40); where it is
    nearly low-rank (a power-law spectrum) it is best at ``K <= 4`` and twice as high at
    ``K = 64``; on digits the best is ``K = 4`` to ``8``. Keeping 90% of the rank lands between:
    ``K = 16`` and ``32`` on the teacher's 128 -> 512 and 512 -> 128 layers at 1/8 of dense,
    ``K = 8`` on digits. The rule is a default: where it matters, tune ``K`` on held-out data, as
    ``nanomoe compare`` does.
    """
    if min_rank < 1:
        raise ValueError(f"min_rank must be >= 1, got {min_rank}")
    if not 0 < rank_fraction <= 1:
        raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction}")
    limit = absolute_budget(in_features, out_features, budget, bias, metric)
    square = {
        config.num_blocks[0]: config
        for config in feasible_configs(in_features, out_features, limit, mixing, bias, metric)
        if config.num_blocks[0] == config.num_blocks[1]
    }
    if 1 not in square:  # K = 1 is the cheapest: if it does not fit, nothing does
        raise ValueError(
            f"no NanoMoE {mixing} configuration of a {in_features}->{out_features} layer fits "
            f"a budget of {limit} {metric}"
        )
    floor = max(min_rank, rank_fraction * square[1].rank)
    roomy = [k for k, config in square.items() if config.rank >= floor]
    return square[max(roomy, default=1)]
