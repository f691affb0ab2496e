"""Multi-process jobs that tests/test_distributed.py launches, each as a real torch.distributed run.

    torchrun --standalone --nproc-per-node 2 tests/distributed_jobs.py JOB OUT [--backend gloo]
    python tests/distributed_jobs.py load OUT        # one process, no process group at all

Every job trains (or runs) small models built with ``NanoMoELinear`` and writes what it measured
to ``OUT/JOB.json`` from rank 0; the test reads it and decides. Data parallelism is checked against
one process on the concatenated (global) batch, which is the same optimization problem: every rank
takes an equal slice of each global batch and DDP/FSDP average the gradients of their means.
"""

import argparse
import copy
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import parallelize_module
from torch.nn.parallel import DistributedDataParallel

import nanomoe
from nanomoe.parallel import BlockParallel

MIXINGS = ("scalar", "diagonal", "diagonal_outer", "full")
STEPS = 4  # optimizer steps per phase (the checkpoint jobs run two phases)
GLOBAL_BATCH = 16
IN, HIDDEN, OUT = 24, 32, 8


def make_model(
    first: str,
    second: str,
    device: torch.device,
    first_blocks: tuple[int, int] = (4, 3),
    second_bias: bool = True,
) -> nn.Sequential:
    """Two NanoMoE layers; by default (4, 3) and 2 blocks, so FSDP2 shards some dim 0 unevenly."""
    torch.manual_seed(0)
    return nn.Sequential(
        nanomoe.NanoMoELinear(IN, HIDDEN, rank=4, num_blocks=first_blocks, mixing=first),
        nn.GELU(),
        nanomoe.NanoMoELinear(HIDDEN, OUT, rank=3, num_blocks=2, mixing=second, bias=second_bias),
    ).to(device)


def global_batches(device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """The same global batches on every rank (and in the one-process reference)."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2 * STEPS):
        x = torch.randn(GLOBAL_BATCH, IN, generator=generator)
        target = torch.randn(GLOBAL_BATCH, OUT, generator=generator)
        batches.append((x.to(device), target.to(device)))
    return batches


def local_rows(tensor: Tensor) -> Tensor:
    """This rank's equal slice of a global batch (the whole batch without a process group)."""
    if not dist.is_initialized():
        return tensor
    return tensor.chunk(dist.get_world_size())[dist.get_rank()]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[Tensor, Tensor]],
    steps: int,
    rows: Callable[[Tensor], Tensor],
) -> None:
    for _ in range(steps):
        x, target = next(batches)
        loss = nn.functional.mse_loss(model(rows(x)), rows(target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def full_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter whole, on the CPU (gathered from the ranks' shards under FSDP2)."""
    params = {}
    for name, param in model.named_parameters():
        whole = param.full_tensor() if isinstance(param, DTensor) else param
        params[name.removeprefix("module.")] = whole.detach().cpu()
    return params


def largest_difference(mine: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """max |mine - reference| over every parameter, relative to that parameter's largest entry."""
    assert mine.keys() == reference.keys(), (sorted(mine), sorted(reference))
    return max(
        ((mine[name] - reference[name]).abs().max() / reference[name].abs().max()).item()
        for name in reference
    )


def one_process_run(mixings: tuple[str, str], device: torch.device) -> dict[str, Tensor]:
    """The reference: one process, no wrapper, trained on the whole global batches."""
    model = make_model(*mixings, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, iter(global_batches(device)), STEPS, lambda tensor: tensor)
    return full_parameters(model)


def shard_fully(model: nn.Sequential) -> nn.Sequential:
    """FSDP2: each NanoMoE layer its own unit, then the root."""
    for layer in model:
        if isinstance(layer, nanomoe.NanoMoELinear):
            fully_shard(layer)
    fully_shard(model)
    return model


def data_parallel(device: torch.device, wrap: Callable[[nn.Module], nn.Module]) -> dict:
    """Per mixing: the largest relative parameter difference to one process after STEPS steps."""
    differences = {}
    for mixing in MIXINGS:
        model = wrap(make_model(mixing, mixing, device))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        train(model, optimizer, iter(global_batches(device)), STEPS, local_rows)
        differences[mixing] = largest_difference(
            full_parameters(model), one_process_run((mixing, mixing), device)
        )
    return differences


def ddp_wrapper(device: torch.device) -> Callable[[nn.Module], nn.Module]:
    ids = [device.index] if device.type == "cuda" else None
    return lambda model: DistributedDataParallel(model, device_ids=ids)


def ddp(device: torch.device, out: Path) -> dict:
    return data_parallel(device, ddp_wrapper(device))


def unsynchronized(device: torch.device, out: Path) -> dict:
    """The control: every rank trains alone on its slice, so its parameters must land far from
    one process's; a comparison that cannot see this could not see a broken all-reduce either."""
    return data_parallel(device, lambda model: model)


def fsdp(device: torch.device, out: Path) -> dict:
    return data_parallel(device, shard_fully)


CHECKPOINT_MIXINGS = ("diagonal_outer", "full")  # the two layers of the checkpointed model


def compiled(device: torch.device, out: Path) -> dict:
    """DDP and FSDP2 training through torch.compile (the operator's fake kernels let it trace
    the layers): the largest relative parameter difference to one process, uncompiled."""
    reference = one_process_run(CHECKPOINT_MIXINGS, device)
    differences = {}
    for name, wrap in (("ddp", ddp_wrapper(device)), ("fsdp", shard_fully)):
        torch.compiler.reset()
        model = wrap(make_model(*CHECKPOINT_MIXINGS, device))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        batches = iter(global_batches(device))
        train(torch.compile(model), optimizer, batches, STEPS, local_rows)
        differences[name] = largest_difference(full_parameters(model), reference)
    return differences


def checkpointed_training(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The checkpoint jobs' model and optimizer: FSDP2 on several ranks, plain in one process."""
    model = make_model(*CHECKPOINT_MIXINGS, device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        model = shard_fully(model)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def save(device: torch.device, out: Path) -> dict:
    """Trains STEPS steps, saves a distributed checkpoint, trains STEPS more: the reference that
    every load must reproduce."""
    model, optimizer = checkpointed_training(device)
    batches = iter(global_batches(device))
    train(model, optimizer, batches, STEPS, local_rows)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=out / "checkpoint")
    train(model, optimizer, batches, STEPS, local_rows)
    params = full_parameters(model)
    if rank() == 0:
        torch.save(params, out / "continued.pt")
    return {"saved_by": world_size()}


def load(device: torch.device, out: Path) -> dict:
    """Loads the checkpoint into this job's world size, trains the second phase, and measures
    how far that lands from the run that never stopped."""
    model, optimizer = checkpointed_training(device)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=out / "checkpoint", no_dist=not dist.is_initialized())
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    batches = iter(global_batches(device)[STEPS:])
    train(model, optimizer, batches, STEPS, local_rows)
    reference = torch.load(out / "continued.pt")
    return {
        "loaded_by": world_size(),
        "difference": largest_difference(full_parameters(model), reference),
    }


def blocks(device: torch.device, out: Path) -> dict:
    """Per mixing: two layers block-parallel (replicated input, features sharded between them,
    replicated output) against the same layers whole, on a 3-D input. The largest relative
    difference of the output, the input's gradient and every parameter's gradient, over the
    ranks. The first layer has 4 blocks each way (two per rank), the second 2 and no bias."""
    mesh = init_device_mesh(device.type, (world_size(),))
    differences = {}
    for mixing in MIXINGS:
        whole = make_model(mixing, mixing, device, first_blocks=(4, 4), second_bias=False)
        sharded = copy.deepcopy(whole)
        plan = {
            "0": BlockParallel(input_layout=Replicate()),
            "2": BlockParallel(output_layout=Replicate()),
        }
        parallelize_module(sharded, mesh, plan)
        difference = largest_difference(
            forward_backward(sharded, device), forward_backward(whole, device)
        )
        differences[mixing] = worst_over_ranks(difference, device)
    try:  # 3 input blocks cannot be split over 2 ranks
        parallelize_module(make_model("scalar", "scalar", device)[0], mesh, BlockParallel())
        refusal = "none"
    except ValueError as error:
        refusal = str(error)
    return {"differences": differences, "refusal": refusal, "collectives": collectives(mesh)}


def collectives(mesh: DeviceMesh) -> dict[str, dict[str, int]]:
    """The collectives of one block-parallel layer between sharded features (forward, backward)."""
    layer = nanomoe.NanoMoELinear(IN, HIDDEN, rank=4, num_blocks=(4, 2), device=mesh.device_type)
    parallelize_module(layer, mesh, BlockParallel())
    x = torch.randn(3, 5, IN // world_size(), device=mesh.device_type, requires_grad=True)
    counts = {}
    with CommDebugMode() as forward:
        out = layer(x)
    with CommDebugMode() as backward:
        out.sum().backward()
    for name, mode in (("forward", forward), ("backward", backward)):
        counts[name] = {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items()}
    return counts


def worst_over_ranks(value: float, device: torch.device) -> float:
    worst = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def forward_backward(model: nn.Module, device: torch.device) -> dict[str, Tensor]:
    """The output, the input's gradient and the parameters' gradients (whole) of one batch, as
    (4, 4, IN)."""
    x = global_batches(device)[0][0].view(4, 4, IN).requires_grad_()
    out = model(x)
    out.square().sum().backward()
    results = {"out": out.detach().cpu(), "grad_x": x.grad.cpu()}
    for index in (0, 2):
        results[f"{index}.to_dense"] = model[index].to_dense().detach().cpu()
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        results[name] = grad.cpu()
    return results


JOBS = {
    "ddp": ddp,
    "compiled": compiled,
    "unsynchronized": unsynchronized,
    "fsdp": fsdp,
    "save": save,
    "load": load,
    "blocks": blocks,
}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job", choices=JOBS)
    parser.add_argument("out", type=Path)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    args = parser.parse_args()
    device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        if args.backend == "nccl":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(args.backend, timeout=timedelta(seconds=120))
    try:
        result = JOBS[args.job](device, args.out)
        if rank() == 0:
            (args.out / f"{args.job}.json").write_text(json.dumps(result))
        if dist.is_initialized():
            dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if "WORLD_SIZE" in os.environ:
        exit_without_finalizing()


def exit_without_finalizing() -> None:
    """Leaves a torchrun worker without finalizing the interpreter. destroy_process_group() does
    not stop gloo's worker threads, and one may drop its last reference to a finished collective
    (so to tensors that Python objects wrap) only after main() has returned; once Py_FinalizeEx
    has begun, that decref's GIL acquire ends the thread by pthread_exit, whose unwinding through
    a noexcept destructor is std::terminate: "terminate called without an active exception"
    (pytorch/pytorch#190489, #38228). Seen about once in a hundred save jobs on 2 busy cores."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
