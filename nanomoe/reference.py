"""NanoMoE in plain PyTorch: the test oracle and the baseline the benchmarks compare against.

Written for clarity, straight from SPEC section 2, with einsum; it does not call the compiled
operator, so it can check it.
"""

from typing import Optional

import torch
from torch import Tensor


def mix_blocks(
    hidden: Tensor,
    mix: Tensor,
    mix_left: Optional[Tensor] = None,
    mix_right: Optional[Tensor] = None,
) -> Tensor:
    """The gate: ``mixed_i = sum_j G_ij hidden_j``, ``hidden`` of shape ``(..., K_in, r)``."""
    if mix.dim() == 2:  # scalar: G_ij = mix[i, j] * I
        return torch.einsum("ij,...jr->...ir", mix, hidden)
    if mix.dim() == 4:  # full: G_ij = mix[i, j]
        return torch.einsum("ijab,...jb->...ia", mix, hidden)
    mixed = torch.einsum("ijr,...jr->...ir", mix, hidden)  # diagonal: G_ij = diag(mix[i, j])
    if mix_left is not None and mix_right is not None:  # + mix_left[i, j] mix_right[i, j]^T
        dots = torch.einsum("ijr,...jr->...ij", mix_right, hidden)
        mixed = mixed + torch.einsum("...ij,ijr->...ir", dots, mix_left)
    return mixed


def nanomoe_linear_reference(
    x: Tensor,
    down: Tensor,
    mix: Tensor,
    up: Tensor,
    bias: Optional[Tensor] = None,
    mix_left: Optional[Tensor] = None,
    mix_right: Optional[Tensor] = None,
) -> Tensor:
    """Same contract as :func:`nanomoe.nanomoe_linear`, in plain PyTorch."""
    in_blocks, _, in_block = down.shape
    out_blocks, out_block, _ = up.shape
    x_blocks = x.reshape(*x.shape[:-1], in_blocks, in_block)
    hidden = torch.einsum("...jn,jrn->...jr", x_blocks, down)
    mixed = mix_blocks(hidden, mix, mix_left, mix_right)
    out = torch.einsum("...ir,imr->...im", mixed, up).reshape(*x.shape[:-1], out_blocks * out_block)
    return out if bias is None else out + bias


def dense_weight_reference(
    down: Tensor,
    mix: Tensor,
    up: Tensor,
    mix_left: Optional[Tensor] = None,
    mix_right: Optional[Tensor] = None,
) -> Tensor:
    """The equivalent ``(out, in)`` weight: block ``(i, j)`` is ``up[i] G_ij down[j]``."""
    in_features = down.shape[0] * down.shape[2]
    eye = torch.eye(in_features, dtype=down.dtype, device=down.device)
    return nanomoe_linear_reference(eye, down, mix, up, None, mix_left, mix_right).T
