"""Train a NanoMoE model on several processes, with checkpoints that survive a change of world size.

    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel ddp
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel fsdp2 --checkpoint ckpt
    torchrun --nproc-per-node 4 examples/train_distributed.py --parallel fsdp2 --checkpoint ckpt
    python examples/train_distributed.py --checkpoint ckpt --steps 100   # one process resumes it
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel blocks

The model is an MLP of two ``NanoMoELinear`` layers regressing a fixed random teacher. ``ddp`` and
``fsdp2`` split every global batch between the ranks; ``blocks`` shards each layer by its blocks
(``nanomoe.parallel.BlockParallel``) and gives every rank the whole batch. ``--checkpoint DIR``
resumes from DIR when it holds a checkpoint and saves there at the end, with
``torch.distributed.checkpoint``: saved by any world size and parallelism, loaded by any other.
"""

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import parallelize_module
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import nanomoe
from nanomoe.parallel import BlockParallel

FEATURES, HIDDEN = 256, 1024


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parallel", choices=("ddp", "fsdp2", "blocks"), default="ddp")
    p.add_argument("--mixing", default="diagonal")
    p.add_argument("--num-blocks", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=200, help="steps to train (after resuming)")
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="fsdp2: bfloat16 compute, float32 master")
    p.add_argument("--checkpoint", type=Path, help="resume from and save to this directory")
    return p.parse_args()


def build(args: argparse.Namespace, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)  # the same initial model on every rank
    layer = dict(rank=args.rank, num_blocks=args.num_blocks, mixing=args.mixing, device=device)
    return nn.Sequential(
        nanomoe.NanoMoELinear(FEATURES, HIDDEN, **layer),
        nn.GELU(),
        nanomoe.NanoMoELinear(HIDDEN, FEATURES, **layer),
    )


def parallelize(model: nn.Sequential, args: argparse.Namespace, device: torch.device) -> nn.Module:
    if not dist.is_initialized():
        return model
    if args.parallel == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if args.parallel == "fsdp2":
        compute = torch.bfloat16 if args.bf16 else None
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for layer in (model[0], model[2]):
            fully_shard(layer, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    plan = {  # features stay sharded between the layers; the GELU runs on each rank's own
        "0": BlockParallel(input_layout=Replicate()),
        "2": BlockParallel(output_layout=Replicate()),
    }
    return parallelize_module(model, mesh, plan)


def teacher_batches(
    args: argparse.Namespace, device: torch.device, start: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Global batches of a fixed random teacher; batch ``i`` is the same on every rank and run."""
    weight = torch.randn(FEATURES, FEATURES, generator=torch.Generator().manual_seed(1))
    step = start
    while True:
        x = torch.randn(args.batch, FEATURES, generator=torch.Generator().manual_seed(100 + step))
        yield x.to(device), torch.tanh(x @ weight / FEATURES**0.5).to(device)
        step += 1


def local_rows(tensor: Tensor, args: argparse.Namespace) -> Tensor:
    """Data parallelism: this rank's slice of the global batch (block parallelism: all of it)."""
    if not dist.is_initialized() or args.parallel == "blocks":
        return tensor
    return tensor.chunk(dist.get_world_size())[dist.get_rank()]


def main() -> None:
    args = parse_args()
    device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    model = parallelize(build(args, device), args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    start = 0
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "step": torch.tensor(0)}
    if args.checkpoint is not None and (args.checkpoint / ".metadata").exists():
        dcp.load(state, checkpoint_id=args.checkpoint, no_dist=not dist.is_initialized())
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        start = int(state["step"])
        if main_rank:
            print(f"resumed from {args.checkpoint} at step {start}")

    batches = teacher_batches(args, device, start)
    progress = tqdm(range(start, start + args.steps), desc="training", disable=not main_rank)
    for _ in progress:
        x, target = next(batches)
        loss = nn.functional.mse_loss(model(local_rows(x, args)), local_rows(target, args))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")  # rank 0's slice
    if main_rank:
        print(f"step {start + args.steps}: loss {loss.item() if args.steps else float('nan'):.4f}")

    if args.checkpoint is not None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        step = torch.tensor(start + args.steps)
        state = {"model": model_state, "optimizer": optimizer_state, "step": step}
        writer = dcp.FileSystemWriter(args.checkpoint, overwrite=True)  # the latest state only
        dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())
        if main_rank:
            print(f"saved {args.checkpoint}")
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()
        # gloo's worker threads outlive the process group, and one that drops its last tensor
        # while the interpreter finalizes aborts the process (pytorch/pytorch#190489): leave
        # without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
