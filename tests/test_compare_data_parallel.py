"""`torchrun --nproc-per-node 2 -m nanomoe compare` gives one process's results for the same
global batches: the same tuning choices, losses and held-out scores up to float rounding."""

import json
from pathlib import Path

import pytest
import torch.distributed as dist
from launch import run_job

from nanomoe.compare import data_parallel
from nanomoe.compare.cli import main

# Every kind with a twist under data parallelism: plain, NanoMoE's operator, and the routed MoE,
# whose load-balancing loss needs the routing shares of the whole global batch.
ARGS = ["--tasks", "teacher", "charlm", "--kinds", "lowrank", "nanomoe-diagonal", "moe"]
ARGS += ["--budgets", "0.5", "--block-counts", "2", "--moe-experts", "2", "--lrs", "1e-3", "1e-2"]
ARGS += ["--seeds", "0", "--size", "tiny", "--steps", "6"]
TOLERANCE = 1e-5  # relative: float32 sums over the global batch in another order


def close(mine: float, reference: float) -> bool:
    return abs(mine - reference) <= TOLERANCE * max(1.0, abs(reference))


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_two_ranks_give_one_process_results(tmp_path: Path) -> None:
    main([*ARGS, "--out", str(tmp_path / "one")])
    run_job(["-m", "nanomoe", "compare", *ARGS, "--out", str(tmp_path / "two")], ranks=2)
    one, two = (
        json.loads((tmp_path / name / "compare.json").read_text()) for name in ("one", "two")
    )
    assert (one["machine"]["ranks"], two["machine"]["ranks"]) == (1, 2)
    assert len(one["runs"]) == len(two["runs"]) == 6  # the tuned learning rate's run per kind
    for mine, reference in zip(two["runs"], one["runs"]):
        label = (reference["task"], reference["kind"])
        for key in ("task", "kind", "learning_rate", "layers", "memory_mib"):
            assert mine[key] == reference[key], (label, key)
        assert close(mine["train_loss"], reference["train_loss"]), label
        for split in ("val", "test"):
            for metric, value in reference[split].items():
                assert close(mine[split][metric], value), (label, split, metric)


def test_a_batch_that_does_not_split_evenly_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_parallel, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="global batch of 4 does not split evenly over 3 ranks"):
        data_parallel.check_batch(4, "charlm")
    data_parallel.check_batch(6, "charlm")
