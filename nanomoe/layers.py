"""``NanoMoELinear`` and ``LowRankLinear``: drop-in replacements for ``nn.Linear``."""

import math
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from nanomoe._ops import nanomoe_linear
from nanomoe.budget import (
    BlockCount,
    Budget,
    Metric,
    Mixing,
    absolute_budget,
    auto_config,
    check_layer,
    gate_shapes,
    nanomoe_rank_for_budget,
)


class NanoMoELinear(nn.Module):
    """A NanoMoE layer (SPEC section 2): ``y_i = sum_j up[i] G_ij down[j] x_j + bias_i``.

    The input is split into ``K_in`` blocks, each projected down to ``rank`` features by its own
    ``down[j]``; the blocks are mixed by a learned gate ``G_ij`` (``mixing``: ``"scalar"``,
    ``"diagonal"``, ``"diagonal_outer"`` or ``"full"``); each of the ``K_out`` output blocks is
    projected up by its own ``up[i]``. The equivalent weight can have rank ``rank * min(K_out,
    K_in)`` for about the parameters of a rank-``rank`` factorization.

    Args:
        in_features, out_features: as in ``nn.Linear``.
        rank: the width each block is projected to (not the rank of the whole weight); ``None``
            to take the largest that fits ``budget``.
        num_blocks: ``K`` for ``K_out = K_in = K``, or a pair ``(K_out, K_in)``; ``"auto"`` to
            choose ``K`` and the rank for ``budget`` by ``nanomoe.budget.auto_config``'s rule.
        mixing: the gate variant.
        bias, device, dtype: as in ``nn.Linear``.
        budget: with ``rank=None``: the parameters (or, with ``budget_metric="macs"``,
            multiply-adds per token) the layer may use, an int, or a float in ``(0, 1]`` for that
            fraction of the ``nn.Linear`` it replaces.
        budget_metric: ``"params"`` or ``"macs"``.

    ``NanoMoELinear(1024, 1024, num_blocks="auto", budget=1 / 8)`` is the layer to start from
    when only the budget is known.
    """

    mix_left: Optional[Tensor]
    mix_right: Optional[Tensor]
    bias: Optional[Tensor]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: Optional[int] = None,
        num_blocks: Union[BlockCount, str] = 4,
        mixing: Mixing = "scalar",
        bias: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        budget: Optional[Budget] = None,
        budget_metric: Metric = "params",
    ) -> None:
        super().__init__()
        rank, num_blocks = _resolve_size(
            in_features, out_features, rank, num_blocks, mixing, bias, budget, budget_metric
        )
        k_out, k_in = check_layer(in_features, out_features, rank, num_blocks, mixing)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.num_blocks = (k_out, k_in)
        self.mixing = mixing
        self.down = nn.Parameter(torch.empty(k_in, rank, in_features // k_in, **factory))
        self.up = nn.Parameter(torch.empty(k_out, out_features // k_out, rank, **factory))
        shapes = gate_shapes(mixing, k_out, k_in, rank)
        self.mix = nn.Parameter(torch.empty(shapes[0], **factory))
        has_outer = mixing == "diagonal_outer"
        self.mix_left = nn.Parameter(torch.empty(shapes[1], **factory)) if has_outer else None
        self.mix_right = nn.Parameter(torch.empty(shapes[2], **factory)) if has_outer else None
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default initialization (SPEC section 4).

        Entries of the equivalent weight get, in expectation, ``nn.Linear``'s variance
        ``1 / (3 in_features)``. Every factor is uniform and zero-mean; ``down[j]`` as an
        ``nn.Linear`` over its block (variance ``1 / (3 n_b)``), each gate ``G_ij`` with total
        energy ``sum_ab E[G_ab^2] = rank`` (split evenly between the diagonal and the outer product
        for diagonal_outer), and ``up`` with variance ``1 / (rank K_in)``, so that
        ``Var W = rank * Var(up) * Var(down) = 1 / (3 in_features)``. Random gates make the
        equivalent weight full-rank (``rank * min(K_out, K_in)``) from the start.
        """
        k_in = self.num_blocks[1]
        variances = init_variances(self.mixing, self.rank, k_in, self.in_features // k_in)
        for name, variance in variances.items():
            uniform_with_variance_(getattr(self, name), variance)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return nanomoe_linear(
            x, self.down, self.mix, self.up, self.bias, self.mix_left, self.mix_right
        )

    @torch.jit.unused
    def to_dense(self) -> Tensor:
        """The equivalent ``(out_features, in_features)`` weight (differentiable)."""
        eye = torch.eye(self.in_features, dtype=self.down.dtype, device=self.down.device)
        return nanomoe_linear(
            eye, self.down, self.mix, self.up, None, self.mix_left, self.mix_right
        ).T

    def extra_repr(self) -> str:
        has_bias = self.bias is not None
        return _describe(
            self.in_features, self.out_features, self.rank, self.num_blocks, self.mixing, has_bias
        )

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # torch names each tensor whose shape differs, with both shapes; a layer of another rank,
        # block count or variant differs in several at once, so also say which layer the checkpoint
        # holds (read off its shapes) and which one it is loaded into. Keys that are missing or
        # unexpected alone (a variant with or without mix_left, a bias or none) torch names itself,
        # and fails on them only under strict, which this method cannot see (torch passes it True).
        errors = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        saved = _saved_layer(state_dict, prefix)
        if len(error_msgs) > errors and saved is not None and saved != self.extra_repr():
            where = f" {prefix[:-1]!r}" if prefix else ""
            error_msgs.append(
                f"the checkpoint holds a NanoMoELinear({saved}), but this layer{where} is "
                f"NanoMoELinear({self.extra_repr()})"
            )


class LowRankLinear(nn.Module):
    """Low-rank factorization ``y = up (down x) + bias``: the baseline NanoMoE is measured against.

    ``down`` is ``(rank, in_features)`` and ``up`` is ``(out_features, rank)``, both laid out like
    ``nn.Linear`` weights; the product has ``nn.Linear``'s default variance, as in NanoMoELinear.
    """

    bias: Optional[Tensor]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_layer(in_features, out_features, rank, 1, "scalar")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.up = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        uniform_with_variance_(self.down, 1.0 / (3 * self.in_features))
        uniform_with_variance_(self.up, 1.0 / self.rank)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.down), self.up, self.bias)

    @torch.jit.unused
    def to_dense(self) -> Tensor:
        """The equivalent ``(out_features, in_features)`` weight."""
        return self.up @ self.down

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )


def _resolve_size(
    in_features: int,
    out_features: int,
    rank: Optional[int],
    num_blocks: Union[BlockCount, str],
    mixing: Mixing,
    bias: bool,
    budget: Optional[Budget],
    metric: Metric,
) -> tuple[int, BlockCount]:
    """The rank and block count NanoMoELinear builds: as given, or chosen for ``budget``."""
    if isinstance(num_blocks, str) and num_blocks != "auto":
        raise ValueError(f"num_blocks must be an int, a pair or 'auto', got {num_blocks!r}")
    if rank is not None:
        if budget is not None or num_blocks == "auto":
            raise ValueError(
                "give either rank (with an explicit num_blocks) or budget, not both: "
                f"got rank={rank}, num_blocks={num_blocks!r}, budget={budget!r}"
            )
        return rank, num_blocks
    if budget is None:
        raise ValueError("NanoMoELinear needs a rank, or a budget to choose one from")
    if num_blocks == "auto":
        config = auto_config(in_features, out_features, budget, mixing, bias, metric)
        return config.rank, config.num_blocks
    limit = absolute_budget(in_features, out_features, budget, bias, metric)
    rank = nanomoe_rank_for_budget(
        in_features, out_features, limit, num_blocks, mixing, bias, metric
    )
    return rank, num_blocks


def _describe(
    in_features: int,
    out_features: int,
    rank: int,
    num_blocks: tuple[int, int],
    mixing: str,
    bias: bool,
) -> str:
    """NanoMoELinear's configuration as its repr shows it."""
    k_out, k_in = num_blocks
    blocks = f"{k_out}" if k_out == k_in else f"({k_out}, {k_in})"
    return (
        f"in_features={in_features}, out_features={out_features}, rank={rank}, "
        f"num_blocks={blocks}, mixing={mixing!r}, bias={bias}"
    )


def _saved_layer(state_dict: Mapping[str, Any], prefix: str) -> Optional[str]:
    """The configuration of the NanoMoELinear a checkpoint was saved from, read off its tensors'
    shapes (SPEC section 3); None where they do not describe one."""
    down, mix, up = (state_dict.get(prefix + name) for name in ("down", "mix", "up"))
    if not (isinstance(down, Tensor) and isinstance(mix, Tensor) and isinstance(up, Tensor)):
        return None
    if down.dim() != 3 or up.dim() != 3 or not 2 <= mix.dim() <= 4:
        return None
    (k_in, rank, n_b), (k_out, m_b, _) = down.shape, up.shape
    if mix.dim() == 3:
        mixing = "diagonal_outer" if prefix + "mix_left" in state_dict else "diagonal"
    else:
        mixing = "scalar" if mix.dim() == 2 else "full"
    bias = prefix + "bias" in state_dict
    return _describe(k_in * n_b, k_out * m_b, rank, (k_out, k_in), mixing, bias)


def init_variances(mixing: Mixing, rank: int, k_in: int, block_in: int) -> Dict[str, float]:
    """The variance ``NanoMoELinear.reset_parameters`` gives the entries of each parameter (its
    docstring says why), by name; ``block_in`` is the input block size ``n_b``."""
    variances = {"down": 1.0 / (3 * block_in), "up": 1.0 / (rank * k_in)}
    if mixing == "scalar" or mixing == "diagonal":
        variances["mix"] = 1.0
    elif mixing == "full":
        variances["mix"] = 1.0 / rank
    else:  # diag(mix) carries half the energy, mix_left mix_right^T the other half
        outer = 1.0 / math.sqrt(2 * rank)
        variances.update(mix=0.5, mix_left=outer, mix_right=outer)
    return variances


def uniform_with_variance_(tensor: Tensor, variance: float) -> None:
    """Fill with a zero-mean uniform distribution of the given variance."""
    bound = math.sqrt(3.0 * variance)
    nn.init.uniform_(tensor, -bound, bound)
