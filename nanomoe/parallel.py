"""Block parallelism: a ``NanoMoELinear`` sharded over ranks by its blocks, with DTensor.

NanoMoE's output blocks are independent once the hidden features ``hidden_j = down[j] x_j`` of
every input block are known. So on a 1-D mesh of ``N`` ranks, rank ``p`` holds input blocks
``J_p`` (their ``down``) and output blocks ``I_p`` (their ``up``, their rows of the gate, their
slice of the bias), each an ``N``-th of the layer:

1. ``hidden_j`` for its own input blocks, from its own slice of the input features;
2. an all-gather of the hidden features: ``K_in * r`` values per token, not ``in_features``;
3. the gate and ``up`` of its own output blocks, giving its own slice of the output features.

Input and output are both sharded by features (``Shard(-1)``), so block-parallel layers chain
through elementwise activations without any other communication. The backward reduce-scatters the
hidden features' gradient, the same volume. README, "Block parallelism", compares this with
tensor-parallel ``nn.Linear``.

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import parallelize_module
    from nanomoe.parallel import BlockParallel

    mesh = init_device_mesh("cuda", (world_size,))
    parallelize_module(model, mesh, {
        "mlp.fc1": BlockParallel(input_layout=Replicate()),    # output: this rank's features
        "mlp.fc2": BlockParallel(output_layout=Replicate()),   # input: those same features
    })

Parameters become DTensors (``Shard(0)``: by block, or by feature for the bias), so optimizers,
``state_dict`` and ``torch.distributed.checkpoint`` (which reshards on load) work unchanged. The
gate and ``up`` run in the fused operator; the local down-projection is one batched matmul.
Needs torch >= 2.7 (``src_data_rank`` of ``distribute_tensor`` and of parallel styles).
"""

from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ParallelStyle

from nanomoe._ops import nanomoe_linear
from nanomoe.layers import NanoMoELinear

__all__ = ["BlockParallel", "BlockParallelNanoMoELinear"]

FEATURES = Shard(-1)


class BlockParallel(ParallelStyle):
    """Shards a ``NanoMoELinear`` by blocks across a 1-D device mesh (module docstring).

    Args:
        input_layout: how a plain-tensor input is laid out across the ranks: ``Shard(-1)`` (each
            rank holds its own slice of the features, as a block-parallel layer's output is) or
            ``Replicate()`` (every rank holds all of them). A DTensor input brings its own.
        output_layout: ``Shard(-1)`` (each rank keeps its own output features) or ``Replicate()``
            (all-gathered).
        use_local_output: return the rank's local tensor rather than a DTensor.

    Both block counts must be multiples of the mesh size.
    """

    def __init__(
        self,
        *,
        input_layout: Placement = FEATURES,
        output_layout: Placement = FEATURES,
        use_local_output: bool = True,
    ) -> None:
        super().__init__()
        for name, layout in (("input_layout", input_layout), ("output_layout", output_layout)):
            if not (layout.is_replicate() or _is_feature_shard(layout)):
                raise ValueError(f"{name} must be Shard(-1) or Replicate(), got {layout}")
        self.input_layout = input_layout
        self.output_layout = output_layout
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, NanoMoELinear):
            raise TypeError(f"BlockParallel applies to NanoMoELinear, got {type(module).__name__}")
        if isinstance(module, BlockParallelNanoMoELinear):
            raise ValueError("this NanoMoELinear is already block-parallel")
        if device_mesh.ndim != 1:
            raise ValueError(f"BlockParallel needs a 1-D device mesh, got {device_mesh.ndim}-D")
        ranks = device_mesh.size()
        k_out, k_in = module.num_blocks
        if k_out % ranks or k_in % ranks:
            raise ValueError(
                f"block parallelism over {ranks} ranks needs both block counts to be multiples "
                f"of {ranks}, got num_blocks=({k_out}, {k_in})"
            )
        for name, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(
                param.detach(), device_mesh, [Shard(0)], src_data_rank=self.src_data_rank
            )
            module.register_parameter(name, nn.Parameter(sharded, param.requires_grad))
        # The same swap fully_shard makes: a subclass whose forward works on the local shards.
        module.__class__ = BlockParallelNanoMoELinear
        assert isinstance(module, BlockParallelNanoMoELinear)
        module.device_mesh = device_mesh
        module.layouts = (self.input_layout, self.output_layout, self.use_local_output)
        return module


class BlockParallelNanoMoELinear(NanoMoELinear):
    """A ``NanoMoELinear`` after ``BlockParallel``: DTensor parameters, sharded by block."""

    device_mesh: DeviceMesh
    layouts: tuple[Placement, Placement, bool]  # input, output, use_local_output

    def forward(self, x: Tensor) -> Tensor:
        input_layout, output_layout, use_local_output = self.layouts
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, self.device_mesh, [input_layout], run_check=False)
        features = x.redistribute(self.device_mesh, [FEATURES]).to_local()
        hidden = self._gathered_hidden(features)
        local = nanomoe_linear(
            hidden.flatten(-2),
            self._identity(hidden),
            _local(self.mix),
            _local(self.up),
            _local(self.bias),
            _local(self.mix_left),
            _local(self.mix_right),
        )
        out = DTensor.from_local(local, self.device_mesh, [FEATURES], run_check=False)
        out = out.redistribute(self.device_mesh, [output_layout])
        return out.to_local() if use_local_output else out

    @torch.jit.unused
    def to_dense(self) -> Tensor:
        """The whole equivalent ``(out_features, in_features)`` weight, on every rank."""
        whole = [_whole(t) for t in (self.down, self.mix, self.up, self.mix_left, self.mix_right)]
        down, mix, up, mix_left, mix_right = whole
        assert down is not None and mix is not None and up is not None
        eye = torch.eye(self.in_features, dtype=down.dtype, device=down.device)
        return nanomoe_linear(eye, down, mix, up, None, mix_left, mix_right).T

    def _gathered_hidden(self, features: Tensor) -> Tensor:
        """``(..., K_in, r)``: every input block's hidden features, from this rank's input slice."""
        down = _local(self.down)
        blocks = features.unflatten(-1, (down.shape[0], down.shape[2]))
        local = torch.einsum("...jn,jrn->...jr", blocks, down)
        sharded = DTensor.from_local(local, self.device_mesh, [Shard(local.dim() - 2)])
        gathered = sharded.redistribute(self.device_mesh, [Replicate()])
        # Each rank's gradient covers only its own output blocks' use of the hidden features:
        # partial sums, which the backward of the all-gather reduce-scatters.
        return gathered.to_local(grad_placements=[Partial()])

    def _identity(self, hidden: Tensor) -> Tensor:
        """``down`` for the fused operator, whose input is already the hidden features."""
        blocks, rank = hidden.shape[-2:]
        eye = torch.eye(rank, dtype=hidden.dtype, device=hidden.device)
        return eye.expand(blocks, rank, rank)


def _local(param: Optional[Tensor]) -> Optional[Tensor]:
    return param.to_local() if isinstance(param, DTensor) else param


def _whole(param: Optional[Tensor]) -> Optional[Tensor]:
    return param.full_tensor() if isinstance(param, DTensor) else param


def _is_feature_shard(layout: Placement) -> bool:
    return isinstance(layout, Shard) and layout.dim == -1
