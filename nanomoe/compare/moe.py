"""A token-routed mixture of expert MLPs, the baseline the paper's reviewers asked for.

Each token goes through a learned router, is sent to its ``top_k`` highest-scoring experts, and
gets their outputs weighted by the router: the layer of Switch Transformers (Fedus et al., 2021;
``top_k=1``) and of Mixtral / GShard (``top_k=2``). Each expert is a small MLP
``in_features -> hidden -> out_features`` with GELU, so unlike the other compared layers a routed
MoE is not linear: that is what it is in practice, and it only helps the baseline.

Every expert's parameters count against a parameter budget, though a token uses only ``top_k`` of
them; a multiply-add budget counts the router and the ``top_k`` experts a token visits.

Training adds Switch's load-balancing loss, ``BALANCE_WEIGHT * experts * sum_e f_e P_e`` (``f_e``
the fraction of routing slots given to expert ``e``, ``P_e`` its mean router probability), so the
router does not collapse onto one expert; ``balance_loss(model)`` collects it for the runner. With
``top_k > 1``, ``f_e`` is a fraction of all ``top_k`` slots per token (Mixtral's implementation
counts per token, which is ``top_k`` times larger).
"""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanomoe.budget import Metric, check_metric, largest_rank
from nanomoe.layers import uniform_with_variance_

BALANCE_WEIGHT = 0.01  # Switch Transformers' coefficient


def check_moe(in_features: int, out_features: int, experts: int, hidden: int, top_k: int) -> None:
    """Validate a routed-MoE configuration; raises ``ValueError`` naming the problem."""
    if in_features < 1 or out_features < 1:
        raise ValueError(f"features must be >= 1, got in={in_features}, out={out_features}")
    if experts < 1 or hidden < 1:
        raise ValueError(f"MoE experts and hidden must be >= 1, got {experts} and {hidden}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"MoE top_k must be in [1, experts={experts}], got {top_k}")


def moe_macs(in_features: int, out_features: int, experts: int, hidden: int, top_k: int) -> int:
    """Multiply-adds per token: the router's ``in * experts``, then ``top_k`` expert MLPs of
    ``hidden * (in + out)`` each."""
    check_moe(in_features, out_features, experts, hidden, top_k)
    return in_features * experts + top_k * hidden * (in_features + out_features)


def moe_params(
    in_features: int, out_features: int, experts: int, hidden: int, top_k: int, bias: bool = True
) -> int:
    """Parameters: router, every expert's two matrices, and with ``bias`` each expert's hidden
    bias plus one output bias shared by the experts."""
    check_moe(in_features, out_features, experts, hidden, top_k)
    weights = in_features * experts + experts * hidden * (in_features + out_features)
    return weights + (experts * hidden + out_features if bias else 0)


def moe_hidden_for_budget(
    in_features: int,
    out_features: int,
    limit: int,
    experts: int,
    top_k: int,
    bias: bool,
    metric: Metric,
) -> int:
    """Largest expert hidden width whose cost stays within ``limit``."""
    check_metric(metric)

    def cost(hidden: int) -> int:
        if metric == "macs":
            return moe_macs(in_features, out_features, experts, hidden, top_k)
        return moe_params(in_features, out_features, experts, hidden, top_k, bias)

    return largest_rank(cost, limit, f"routed MoE with {experts} experts (hidden width)")


class RoutedMoE(nn.Module):
    """``y = bias + sum over the token's top_k experts e of weight_e * expert_e(x)``.

    ``expert_e(x) = second[e] @ gelu(first[e] @ x + hidden_bias[e])``. With ``top_k = 1`` the
    weight is the expert's router probability (Switch); with more, the chosen experts' probabilities
    renormalized to sum to one (Mixtral). Tokens are gathered per expert, so an expert costs only
    the tokens routed to it.

    Args:
        in_features, out_features: as in ``nn.Linear``.
        experts: the number of expert MLPs.
        hidden: each expert's hidden width.
        top_k: experts per token.
        bias, device, dtype: as in ``nn.Linear`` (``bias`` also gives the experts hidden biases).
    """

    hidden_bias: Optional[Tensor]
    bias: Optional[Tensor]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        experts: int,
        hidden: int,
        top_k: int = 1,
        bias: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_moe(in_features, out_features, experts, hidden, top_k)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.experts, self.hidden, self.top_k = experts, hidden, top_k
        self.router = nn.Parameter(torch.empty(experts, in_features, **factory))
        self.first = nn.Parameter(torch.empty(experts, hidden, in_features, **factory))
        self.second = nn.Parameter(torch.empty(experts, out_features, hidden, **factory))
        self.hidden_bias = nn.Parameter(torch.empty(experts, hidden, **factory)) if bias else None
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # The load-balancing loss of the last training forward, until balance_loss() takes it.
        self.pending_balance: Optional[Tensor] = None
        # The routing shares' mean over data-parallel ranks (see forward); one process: as is.
        self.mean_over_ranks: Callable[[Tensor], Tensor] = lambda share: share
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's layers as ``nn.Linear`` initializes them; the router starts near uniform
        (small logits), as routers usually do."""
        uniform_with_variance_(self.router, 0.01 / self.in_features)
        uniform_with_variance_(self.first, 1 / (3 * self.in_features))
        uniform_with_variance_(self.second, 1 / (3 * self.hidden))
        for tensor, fan_in in ((self.hidden_bias, self.in_features), (self.bias, self.hidden)):
            if tensor is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(tensor, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got {x.shape}")
        lead = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features)
        probs = (tokens @ self.router.T).softmax(-1)
        chosen_probs, chosen = probs.topk(self.top_k, dim=-1)  # (N, top_k)
        weights = chosen_probs if self.top_k == 1 else chosen_probs / chosen_probs.sum(-1, True)
        out = tokens.new_zeros(tokens.shape[0], self.out_features)
        for expert in range(self.experts):
            rows, slots = torch.nonzero(chosen == expert, as_tuple=True)
            if rows.numel() == 0:
                continue
            inner = tokens[rows] @ self.first[expert].T
            if self.hidden_bias is not None:
                inner = inner + self.hidden_bias[expert]
            routed = F.gelu(inner) @ self.second[expert].T
            out = out.index_add(0, rows, routed * weights[rows, slots, None])
        self.pending_balance = None
        if self.training and tokens.shape[0] > 0:
            share = F.one_hot(chosen, self.experts).to(probs.dtype).mean((0, 1))
            # Data-parallel, the runner has this average the shares over the ranks: those of the
            # whole global batch. The loss is then linear in this rank's mean probabilities, so
            # DDP's average of the ranks' gradients is the gradient of the one-process loss.
            share = self.mean_over_ranks(share)
            self.pending_balance = self.experts * (share * probs.mean(0)).sum()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"experts={self.experts}, hidden={self.hidden}, top_k={self.top_k}, "
            f"bias={self.bias is not None}"
        )


def balance_loss(model: nn.Module) -> Tensor:
    """``BALANCE_WEIGHT`` times the sum of the load-balancing losses of the model's routed-MoE
    layers from their last training forward, which it takes (a second call, or one after an eval
    forward, finds none): zero for a model without any."""
    losses = []
    for module in model.modules():
        if isinstance(module, RoutedMoE) and module.pending_balance is not None:
            losses.append(module.pending_balance)
            module.pending_balance = None
    if not losses:
        return torch.zeros(())
    return BALANCE_WEIGHT * torch.stack(losses).sum()


__all__ = [
    "BALANCE_WEIGHT",
    "RoutedMoE",
    "balance_loss",
    "check_moe",
    "moe_hidden_for_budget",
    "moe_macs",
    "moe_params",
]
