"""Running the multi-process tests' jobs: under torchrun (or one plain process), in bounded time."""

import subprocess
import sys

import pytest

TIMEOUT_S = 300  # a hung collective fails its test instead of the whole CI run


def run_job(args: list[str], ranks: int, timeout_s: float = TIMEOUT_S) -> str:
    """Runs ``python ARGS`` on ``ranks`` processes under torchrun (1: one plain process, with no
    process group) and returns its standard output; fails the test on a nonzero exit or past
    ``timeout_s``. torchrun starts its workers in sessions of their own, so a launcher past its
    time is terminated, not killed: SIGTERM makes it stop its workers, where SIGKILL would leave
    them waiting in a collective."""
    command = [sys.executable, *args]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*launcher, f"--nproc-per-node={ranks}", *args]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with subprocess.Popen(command, **pipes) as process:
        try:
            out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                out, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
            pytest.fail(f"{' '.join(command)} ran past {timeout_s} s:\n{out}\n{err}")
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{out}\n{err}"
    return out
