"""Real multi-process runs (tests/distributed_jobs.py under torchrun): DDP and FSDP2 training of
NanoMoE layers (eager and under torch.compile) match one process on the global batch, a
distributed checkpoint saved by 2 ranks
loads into 1 and into 2 and training continues exactly, and block parallelism equals the whole
layer. 2 ranks with gloo on CPU; nccl as well where 2 GPUs are present."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from launch import run_job
from torch.distributed.tensor import Partial, Placement, Shard

from nanomoe.parallel import BlockParallel

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed, gloo"
)

JOBS = Path(__file__).with_name("distributed_jobs.py")
EXAMPLE = Path(__file__).parents[1] / "examples" / "train_distributed.py"
# Relative parameter difference to one process: float32 rounding of a differently ordered sum.
TOLERANCE = 1e-5
MIXINGS = ("scalar", "diagonal", "diagonal_outer", "full")
BACKENDS = [
    "gloo",
    pytest.param(
        "nccl",
        marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs 2 GPUs"),
    ),
]


def launch(job: str, out: Path, ranks: int = 2, backend: str = "gloo") -> dict:
    """Runs a job of tests/distributed_jobs.py; what it measured."""
    run_job([str(JOBS), job, str(out), *(["--backend", backend] if ranks > 1 else [])], ranks)
    return json.loads((out / f"{job}.json").read_text())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("job", ["ddp", "fsdp"])
def test_data_parallel_training_matches_one_process(job: str, backend: str, tmp_path: Path):
    differences = launch(job, tmp_path, backend=backend)
    assert set(differences) == set(MIXINGS)
    for mixing, difference in differences.items():
        assert difference < TOLERANCE, (mixing, difference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_matches_one_process(backend: str, tmp_path: Path):
    differences = launch("compiled", tmp_path, backend=backend)
    assert set(differences) == {"ddp", "fsdp"}
    for wrapper, difference in differences.items():
        assert difference < TOLERANCE, (wrapper, difference)


def test_the_comparison_sees_ranks_that_do_not_synchronize(tmp_path: Path):
    differences = launch("unsynchronized", tmp_path)
    for mixing, difference in differences.items():
        assert difference > 1000 * TOLERANCE, (mixing, difference)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch.distributed.checkpoint of FSDP2 training on 2 ranks, and where it went next."""
    out = tmp_path_factory.mktemp("checkpoint")
    assert launch("save", out) == {"saved_by": 2}
    return out


@pytest.mark.parametrize("ranks", [1, 2])
def test_checkpoint_from_2_ranks_loads_and_continues(checkpoint: Path, ranks: int):
    result = launch("load", checkpoint, ranks=ranks)
    assert result["loaded_by"] == ranks
    # On 2 ranks the continued run repeats the uninterrupted one's every operation: bitwise.
    assert result["difference"] == 0 if ranks == 2 else result["difference"] < TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_parallel_layers_equal_the_whole_ones(backend: str, tmp_path: Path):
    result = launch("blocks", tmp_path, backend=backend)
    assert set(result["differences"]) == set(MIXINGS)
    for mixing, difference in result["differences"].items():
        assert difference < TOLERANCE, (mixing, difference)
    assert "num_blocks=(4, 3)" in result["refusal"], result["refusal"]
    assert "multiples of 2" in result["refusal"], result["refusal"]
    # Between sharded features, the layer's only communication: the hidden features' all-gather
    # and, backward, its reduce-scatter.
    assert result["collectives"] == {
        "forward": {"all_gather_into_tensor": 1},
        "backward": {"reduce_scatter_tensor": 1},
    }


@pytest.mark.parametrize("layout", [Shard(0), Shard(1), Partial()])
def test_block_parallel_takes_only_feature_shards_or_replicas(layout: Placement):
    with pytest.raises(ValueError, match="Shard"):
        BlockParallel(input_layout=layout)
    with pytest.raises(ValueError, match="output_layout"):
        BlockParallel(output_layout=layout)


def test_the_example_resumes_an_fsdp2_checkpoint_in_one_process(tmp_path: Path):
    """examples/train_distributed.py as the README runs it: FSDP2 in bfloat16 on 2 ranks saves,
    one process resumes, block parallelism on 2 ranks resumes that."""
    checkpoint = ["--checkpoint", str(tmp_path / "checkpoint"), "--batch", "8"]
    small = ["--rank", "4", "--num-blocks", "4", *checkpoint]
    first = run_job(
        [str(EXAMPLE), "--parallel", "fsdp2", "--bf16", "--steps", "3", *small], ranks=2
    )
    assert "step 3: loss" in first and "saved" in first
    second = run_job([str(EXAMPLE), "--steps", "2", *small], ranks=1)
    assert "at step 3" in second and "step 5: loss" in second
    third = run_job([str(EXAMPLE), "--parallel", "blocks", "--steps", "2", *small], ranks=2)
    assert "at step 5" in third and "step 7: loss" in third
