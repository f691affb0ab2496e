"""The fully connected layers ``nanomoe compare`` puts side by side, each sized to one budget.

``layer_factory(kind, budget, budget_kind)`` returns a ``LinearFactory`` that builds, for any
``(in_features, out_features, bias)``, the largest layer of that kind whose parameters (or
multiply-adds per token) stay within ``budget`` times those of the ``nn.Linear`` it replaces. Sizes
come from ``nanomoe.budget``, so the comparison and the library agree on what a layer costs.

Besides low-rank and NanoMoE, the comparison has Monarch (Dao et al., ICML 2022), the other
well-known structured replacement for dense layers, and a token-routed mixture of expert MLPs
(``moe``: top-1 of several experts, see ``nanomoe.compare.moe``), both in plain PyTorch.
"""

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from nanomoe.budget import (
    MIXINGS,
    Metric,
    Mixing,
    absolute_budget,
    dense_macs,
    dense_params,
    largest_rank,
    lowrank_macs,
    lowrank_params,
    lowrank_rank_for_budget,
    nanomoe_macs,
    nanomoe_params,
    nanomoe_rank_for_budget,
)
from nanomoe.compare import LinearFactory
from nanomoe.compare.moe import RoutedMoE, moe_hidden_for_budget, moe_macs, moe_params
from nanomoe.layers import LowRankLinear, NanoMoELinear, uniform_with_variance_

LAYER_KINDS: Tuple[str, ...] = (
    "dense",
    "lowrank",
    "monarch",
    "moe",
    *(f"nanomoe-{mixing}" for mixing in MIXINGS),
)
BUDGET_KINDS: Tuple[str, ...] = ("params", "flops")
MOE_TOP_K = 1  # experts per token of the routed-MoE baseline: Switch routing (see moe.py)

LayerInfo = Dict[str, Any]


def check_monarch(in_features: int, out_features: int, blocks: int, width: int) -> None:
    """Validate a Monarch configuration; raises ``ValueError`` naming the problem."""
    if in_features < 1 or out_features < 1:
        raise ValueError(f"features must be >= 1, got in={in_features}, out={out_features}")
    if blocks < 1 or width < 1:
        raise ValueError(f"Monarch blocks and width must be >= 1, got {blocks} and {width}")
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size % blocks:
            raise ValueError(f"Monarch blocks={blocks} do not divide {name}={size}")
    if width % blocks:
        raise ValueError(f"Monarch blocks={blocks} do not divide width={width}")


def monarch_macs(in_features: int, out_features: int, blocks: int, width: int) -> int:
    """Multiply-adds per token: ``blocks`` products ``(width/blocks) x (in/blocks)``, then
    ``blocks`` products ``(out/blocks) x (width/blocks)``, i.e. ``width (in + out) / blocks``."""
    check_monarch(in_features, out_features, blocks, width)
    return width * (in_features + out_features) // blocks


def monarch_params(
    in_features: int, out_features: int, blocks: int, width: int, bias: bool = True
) -> int:
    """Parameters of ``Monarch``: one weight per multiply-add, plus the bias."""
    return monarch_macs(in_features, out_features, blocks, width) + (out_features if bias else 0)


class Monarch(nn.Module):
    """Monarch layer: block-diagonal ``left``, a stride permutation, block-diagonal ``right``.

    ``x`` is split into ``blocks`` blocks of ``in_features / blocks``; ``left[b]`` maps block ``b``
    to a middle block of ``width / blocks``. The middle blocks are then interleaved (viewed as
    ``(blocks, width / blocks)``, transposed, flattened), so each of the ``blocks`` slices that
    ``right`` reads takes consecutive entries across all middle blocks. ``right[b]`` maps slice
    ``b`` to output block ``b`` of ``out_features / blocks``; then the bias is added.

    When ``width / blocks >= blocks`` every output block sees every input block. Otherwise each
    output block sees only ``width / blocks`` of the input blocks (the equivalent weight has
    blocks of zeros), which is still a valid layer, only a sparser one.

    Args:
        in_features, out_features: as in ``nn.Linear``.
        blocks: the number of diagonal blocks in each factor; must divide ``in_features``,
            ``out_features`` and ``width``.
        width: the size of the middle representation.
        bias, device, dtype: as in ``nn.Linear``.
    """

    bias: Optional[Tensor]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocks: int,
        width: int,
        bias: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_monarch(in_features, out_features, blocks, width)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.blocks, self.width = blocks, width
        middle = width // blocks
        self.left = nn.Parameter(torch.empty(blocks, middle, in_features // blocks, **factory))
        self.right = nn.Parameter(torch.empty(blocks, out_features // blocks, middle, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Give the equivalent weight ``nn.Linear``'s variance ``1 / (3 in_features)``.

        Entry ``(o, i)`` of the equivalent weight is ``sum_t right[o, t] left[t, i]`` over the
        ``width / blocks`` middle entries ``t`` that output ``o`` reads, of which (averaged over
        ``i``) a fraction ``1 / blocks`` comes from the input block of ``i``: ``width / blocks^2``
        products of independent zero-mean factors. With ``left`` as an ``nn.Linear`` over its
        block (``Var = blocks / (3 in_features)``) and ``Var(right) = blocks / width``, the
        expected variance, averaged over entries, is ``(width / blocks^2) * blocks / width *
        blocks / (3 in_features) = 1 / (3 in_features)``.
        """
        uniform_with_variance_(self.left, self.blocks / (3 * self.in_features))
        uniform_with_variance_(self.right, self.blocks / self.width)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got {x.shape}")
        lead, blocks = x.shape[:-1], self.blocks  # sizes spelled out: -1 fails on empty batches
        blocked = x.reshape(*lead, blocks, self.in_features // blocks)
        middle = torch.einsum("...bi,boi->...bo", blocked, self.left)  # (..., blocks, width/blocks)
        mixed = middle.transpose(-1, -2).reshape(*lead, blocks, self.width // blocks)  # stride
        out = torch.einsum("...bi,boi->...bo", mixed, self.right).reshape(*lead, self.out_features)
        return out if self.bias is None else out + self.bias

    @torch.jit.unused
    def to_dense(self) -> Tensor:
        """The equivalent ``(out_features, in_features)`` weight, built from the block matrices."""
        stride = torch.arange(self.width, device=self.left.device)
        stride = stride.reshape(self.blocks, -1).T.reshape(-1)
        return torch.block_diag(*self.right) @ torch.block_diag(*self.left)[stride]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"blocks={self.blocks}, width={self.width}, bias={self.bias is not None}"
        )


def layer_factory(
    kind: str,
    budget: float = 1 / 8,
    budget_kind: str = "params",
    num_blocks: int = 8,
    monarch_blocks: int = 4,
    moe_experts: int = 4,
) -> LinearFactory:
    """A factory for the largest layer of ``kind`` within ``budget`` of the dense layer's cost.

    Args:
        kind: one of ``LAYER_KINDS``.
        budget: the fraction of the ``nn.Linear``'s parameters (bias included, as it counts them)
            or multiply-adds per token that each layer may use; ignored by ``"dense"``.
        budget_kind: ``"params"`` or ``"flops"`` (multiply-adds per token).
        num_blocks: NanoMoE's ``K``. A layer whose features it does not divide gets the largest
            ``K <= num_blocks`` that divides both (at worst 1, where NanoMoE is low-rank plus a
            gate), so any model can be built; ``describe_layer`` reports the ``K`` used.
        monarch_blocks: Monarch's block count, with the same fallback.
        moe_experts: the routed MoE's number of experts (each token visits ``MOE_TOP_K``, or all
            of them when there are fewer).

    Layers are built when the factory is called; a layer for which even the smallest
    configuration (rank 1, or width of one entry per block) is over budget raises ``ValueError``.
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; choose one of {', '.join(LAYER_KINDS)}")
    if budget_kind not in BUDGET_KINDS:
        raise ValueError(f"budget_kind must be 'params' or 'flops', got {budget_kind!r}")
    if not budget > 0:
        raise ValueError(f"budget must be a positive fraction of the dense layer, got {budget}")
    if num_blocks < 1 or monarch_blocks < 1 or moe_experts < 1:
        raise ValueError(
            f"block and expert counts must be >= 1, got {num_blocks}, {monarch_blocks} and "
            f"{moe_experts}"
        )
    metric: Metric = "macs" if budget_kind == "flops" else "params"

    def make(in_features: int, out_features: int, bias: bool) -> nn.Module:
        if kind == "dense":
            return nn.Linear(in_features, out_features, bias)
        limit = absolute_budget(in_features, out_features, float(budget), bias, metric)
        what = f"{kind} for a {in_features}->{out_features} layer at {budget:g} of dense {metric}"
        try:
            return _sized_layer(
                kind,
                in_features,
                out_features,
                bias,
                limit,
                metric,
                {
                    "num_blocks": num_blocks,
                    "monarch_blocks": monarch_blocks,
                    "moe_experts": moe_experts,
                },
            )
        except ValueError as error:
            raise ValueError(f"{what}: {error}") from None

    return make


def _sized_layer(
    kind: str,
    in_features: int,
    out_features: int,
    bias: bool,
    limit: int,
    metric: Metric,
    counts: Dict[str, int],
) -> nn.Module:
    """The largest layer of a compressed ``kind`` costing at most ``limit``; ``counts`` holds the
    block counts (``num_blocks``, ``monarch_blocks``) and the MoE's (``moe_experts``)."""
    if kind == "lowrank":
        rank = lowrank_rank_for_budget(in_features, out_features, limit, bias, metric)
        return LowRankLinear(in_features, out_features, rank, bias)
    if kind == "monarch":
        blocks = _common_divisor(in_features, out_features, counts["monarch_blocks"])
        width = _monarch_width_for_budget(in_features, out_features, limit, blocks, bias, metric)
        return Monarch(in_features, out_features, blocks, width, bias)
    if kind == "moe":
        experts, top_k = counts["moe_experts"], min(MOE_TOP_K, counts["moe_experts"])
        hidden = moe_hidden_for_budget(
            in_features, out_features, limit, experts, top_k, bias, metric
        )
        return RoutedMoE(in_features, out_features, experts, hidden, top_k, bias)
    mixing = _mixing(kind)
    k = _common_divisor(in_features, out_features, counts["num_blocks"])
    rank = nanomoe_rank_for_budget(in_features, out_features, limit, k, mixing, bias, metric)
    return NanoMoELinear(in_features, out_features, rank, k, mixing, bias)


def _mixing(kind: str) -> Mixing:
    """The mixing of a ``"nanomoe-<mixing>"`` kind."""
    for mixing in MIXINGS:
        if kind == f"nanomoe-{mixing}":
            return mixing
    raise ValueError(f"{kind!r} is not a NanoMoE layer kind")


def _common_divisor(in_features: int, out_features: int, most: int) -> int:
    """The largest block count ``<= most`` that divides both feature counts."""
    return max(k for k in range(1, most + 1) if in_features % k == 0 == out_features % k)


def _monarch_width_for_budget(
    in_features: int, out_features: int, limit: int, blocks: int, bias: bool, metric: Metric
) -> int:
    """Largest Monarch width (a multiple of ``blocks``) whose cost stays within ``limit``."""

    def cost(per_block: int) -> int:
        width = blocks * per_block
        if metric == "macs":
            return monarch_macs(in_features, out_features, blocks, width)
        return monarch_params(in_features, out_features, blocks, width, bias)

    if cost(1) > limit:
        raise ValueError(
            f"Monarch with {blocks} blocks: even width {blocks} costs {cost(1)}, "
            f"over the budget of {limit}"
        )
    return blocks * largest_rank(cost, limit, "Monarch")


def describe_layer(module: nn.Module) -> LayerInfo:
    """Kind, parameters, multiply-adds per token and configuration of a comparison layer.

    Keys: ``"kind"`` (one of ``LAYER_KINDS``), ``"params"``, ``"macs"``, and as they apply
    ``"rank"``, ``"num_blocks"`` (``K``, or ``(K_out, K_in)`` when they differ), ``"mixing"``,
    ``"blocks"``, ``"width"``, ``"experts"``, ``"hidden"``, ``"top_k"``. Counts come from the
    counting functions, not from the module's tensors, so a report and a budget always agree.
    Raises ``TypeError`` for other modules.
    """
    if isinstance(module, nn.Linear):
        n, m = module.in_features, module.out_features
        return {
            "kind": "dense",
            "params": dense_params(n, m, module.bias is not None),
            "macs": dense_macs(n, m),
        }
    if isinstance(module, LowRankLinear):
        return _describe_lowrank(module)
    if isinstance(module, NanoMoELinear):
        return _describe_nanomoe(module)
    if isinstance(module, Monarch):
        return _describe_monarch(module)
    if isinstance(module, RoutedMoE):
        return _describe_moe(module)
    raise TypeError(f"describe_layer does not know {type(module).__name__}")


def _describe_lowrank(module: LowRankLinear) -> LayerInfo:
    n, m, rank = module.in_features, module.out_features, module.rank
    return {
        "kind": "lowrank",
        "params": lowrank_params(n, m, rank, module.bias is not None),
        "macs": lowrank_macs(n, m, rank),
        "rank": rank,
    }


def _describe_nanomoe(module: NanoMoELinear) -> LayerInfo:
    n, m, rank, mixing = module.in_features, module.out_features, module.rank, module.mixing
    k_out, k_in = module.num_blocks
    return {
        "kind": f"nanomoe-{mixing}",
        "params": nanomoe_params(n, m, rank, module.num_blocks, mixing, module.bias is not None),
        "macs": nanomoe_macs(n, m, rank, module.num_blocks, mixing),
        "rank": rank,
        "num_blocks": k_out if k_out == k_in else (k_out, k_in),
        "mixing": mixing,
    }


def _describe_monarch(module: Monarch) -> LayerInfo:
    n, m, blocks, width = module.in_features, module.out_features, module.blocks, module.width
    return {
        "kind": "monarch",
        "params": monarch_params(n, m, blocks, width, module.bias is not None),
        "macs": monarch_macs(n, m, blocks, width),
        "blocks": blocks,
        "width": width,
    }


def _describe_moe(module: RoutedMoE) -> LayerInfo:
    n, m = module.in_features, module.out_features
    shape = (module.experts, module.hidden, module.top_k)
    return {
        "kind": "moe",
        "params": moe_params(n, m, *shape, module.bias is not None),
        "macs": moe_macs(n, m, *shape),
        "experts": module.experts,
        "hidden": module.hidden,
        "top_k": module.top_k,
    }


__all__ = [
    "BUDGET_KINDS",
    "LAYER_KINDS",
    "MOE_TOP_K",
    "LayerInfo",
    "Monarch",
    "describe_layer",
    "layer_factory",
    "monarch_macs",
    "monarch_params",
]
