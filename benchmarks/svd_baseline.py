"""The compression experiments' baseline: truncated SVD at a parameter budget, as LowRankLinear."""

import re
from typing import Any, Dict

import torch
from torch import nn

from nanomoe.budget import absolute_budget, lowrank_rank_for_budget
from nanomoe.layers import LowRankLinear


def svd_linear(layer: nn.Linear, rank: int) -> LowRankLinear:
    """``LowRankLinear`` holding the rank-``rank`` truncated SVD of ``layer``'s weight (each factor
    carries the square root of the singular values), bias, dtype and training mode kept."""
    weight = layer.weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    new = LowRankLinear(
        layer.in_features,
        layer.out_features,
        rank,
        bias=layer.bias is not None,
        dtype=layer.weight.dtype,
    )
    with torch.no_grad():
        new.up.copy_(u[:, :rank] * root)
        new.down.copy_(root[:, None] * vh[:rank])
        if layer.bias is not None and new.bias is not None:
            new.bias.copy_(layer.bias)
    return new.train(layer.training)


def replace_svd(model: nn.Module, budget: float, pattern: str) -> Dict[str, Any]:
    """Replace the ``nn.Linear`` layers whose names match ``pattern`` in place by truncated SVD at
    ``budget`` of each layer's parameters (the largest LowRankLinear rank within it). Returns the
    layer count, the mean relative weight error, each layer's rank and the parameters before and
    after."""
    selected = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and re.search(pattern, name)
    ]
    errors, ranks, before, after = [], [], 0, 0
    for name, layer in selected:
        has_bias = layer.bias is not None
        limit = absolute_budget(layer.in_features, layer.out_features, budget, has_bias)
        rank = lowrank_rank_for_budget(layer.in_features, layer.out_features, limit, has_bias)
        new = svd_linear(layer, rank)
        weight = layer.weight.detach().to(torch.float64)
        approx = new.to_dense().detach().to(torch.float64)
        errors.append((torch.linalg.matrix_norm(weight - approx) / weight.norm()).item())
        ranks.append(rank)
        before += sum(p.numel() for p in layer.parameters())
        after += sum(p.numel() for p in new.parameters())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return {
        "layers": len(selected),
        "weight_error": sum(errors) / len(errors),
        "ranks": ranks,
        "layer_params_before": before,
        "layer_params_after": after,
    }
