"""The functional form of the operator, and fake kernels so torch.compile and torch.export trace it.

Argument checking lives in the C++ operator (csrc/checks.cpp), the one place that decides what a
valid call is; the fake kernels only compute the shapes of the results.
"""

from typing import Optional

import torch
from torch import Tensor


def nanomoe_linear(
    x: Tensor,
    down: Tensor,
    mix: Tensor,
    up: Tensor,
    bias: Optional[Tensor] = None,
    mix_left: Optional[Tensor] = None,
    mix_right: Optional[Tensor] = None,
) -> Tensor:
    """NanoMoE forward (SPEC section 2): ``y_i = sum_j up[i] G_ij down[j] x_j + bias_i``.

    ``x`` is ``(..., in_features)``; ``down`` is ``(K_in, rank, in_features / K_in)``; ``up`` is
    ``(K_out, out_features / K_out, rank)``. The gate ``G`` is read off ``mix`` (and
    ``mix_left``/``mix_right``): ``(K_out, K_in)`` scalar, ``(K_out, K_in, rank)`` diagonal (plus
    ``mix_left``, ``mix_right`` of the same shape for diagonal_outer), ``(K_out, K_in, rank, rank)``
    full. Differentiable in every tensor argument.
    """
    return torch.ops.nanomoe.linear(x, down, mix, up, bias, mix_left, mix_right)


def _out_shape(x: Tensor, up: Tensor) -> list[int]:
    return [*x.shape[:-1], up.shape[0] * up.shape[1]]


@torch.library.register_fake("nanomoe::linear")
def _linear_fake(
    x: Tensor,
    down: Tensor,
    mix: Tensor,
    up: Tensor,
    bias: Optional[Tensor] = None,
    mix_left: Optional[Tensor] = None,
    mix_right: Optional[Tensor] = None,
) -> Tensor:
    return x.new_empty(_out_shape(x, up))


@torch.library.register_fake("nanomoe::linear_forward")
def _linear_forward_fake(
    x: Tensor,
    down: Tensor,
    mix: Tensor,
    up: Tensor,
    bias: Optional[Tensor] = None,
    mix_left: Optional[Tensor] = None,
    mix_right: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    tokens = x.numel() // x.shape[-1]
    hidden = x.new_empty([tokens, down.shape[0], down.shape[1]])
    return x.new_empty(_out_shape(x, up)), hidden


@torch.library.register_fake("nanomoe::linear_backward")
def _linear_backward_fake(
    grad_out: Tensor,
    x: Tensor,
    down: Tensor,
    mix: Tensor,
    up: Tensor,
    mix_left: Optional[Tensor],
    mix_right: Optional[Tensor],
    hidden: Tensor,
    output_mask: list[bool],
) -> tuple[Optional[Tensor], ...]:
    like = (x, down, mix, up, None, mix_left, mix_right)
    grads: list[Optional[Tensor]] = []
    for needed, source in zip(output_mask, like):
        if not needed:
            grads.append(None)
        elif source is None:  # the bias: shaped like the output's features
            grads.append(grad_out.new_empty([grad_out.shape[-1]]))
        else:
            grads.append(torch.empty_like(source, memory_format=torch.contiguous_format))
    return tuple(grads)
