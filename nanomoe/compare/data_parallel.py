"""``nanomoe compare`` on several processes: ``torchrun --nproc-per-node N -m nanomoe compare``.

Every rank builds the same models and draws the same global batches; each trains on an equal
slice of every batch under DDP, which averages the gradients of the slices' means: the gradient of
the global batch's mean. So the results are one process's for the same global batch, up to float
rounding, and the runs are N times cheaper per rank. Held-out evaluation is whole on every rank
(the models are identical), and rank 0 alone reports.
"""

import os

import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start() -> bool:
    """Joins the launcher's process group (gloo: the comparison trains on CPU); whether this
    call created it (a caller that already has one keeps it)."""
    if launched() and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


def barrier() -> None:
    if active():
        dist.barrier()


def stop(created: bool) -> None:
    """Leaves the process group, if start() created it."""
    if created:
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The rank that shows progress and writes the results."""
    return not active() or dist.get_rank() == 0


def check_batch(batch_size: int, task: str) -> None:
    if batch_size % world_size():
        raise ValueError(
            f"{task}: a global batch of {batch_size} does not split evenly over "
            f"{world_size()} ranks"
        )


def local_slice(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """This rank's equal slice of every tensor of a global batch (rows: dimension 0)."""
    if not active():
        return batch
    rank = dist.get_rank()
    return tuple(tensor.chunk(world_size())[rank] for tensor in batch)


def wrap(model: nn.Module, unused_parameters: bool) -> nn.Module:
    """DDP around the model when running on several ranks; ``unused_parameters`` for a model
    whose step may leave some parameters out (a routed MoE's idle experts)."""
    if not active():
        return model
    return DistributedDataParallel(model, find_unused_parameters=unused_parameters)


def global_mean(tensor: Tensor) -> Tensor:
    """The mean over the ranks (equal slices: the global batch's mean); not differentiable."""
    if not active():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / world_size()
