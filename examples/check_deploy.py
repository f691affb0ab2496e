"""Checks that the C++ example programs (examples/cpp) reproduce Python, run by ctest.

    python examples/check_deploy.py torchscript --run-model BIN --train-step BIN --work DIR
    (also: aoti, train)

- torchscript / aoti: export the example model in that format (examples/export_model.py), run the
  C++ ``run_model`` on inputs of two batch sizes, and compare with the eager Python model: relative
  error at most 1e-5 (float32).
- train: one SGD step of the TorchScript model in C++ (``train_step``, autograd through nanomoe's
  operators in libtorch) against the same step in Python: the loss and every updated parameter.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torch.jit._pickle
from export_model import IN_FEATURES, OUT_FEATURES, build_model, export_aoti, export_torchscript

TOLERANCE = 1e-5
BATCH_SIZES = (1, 37)
LEARNING_RATE = 0.1
EXPORTS = {"torchscript": ("model.pt", export_torchscript), "aoti": ("model.pt2", export_aoti)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check(what: str, actual: torch.Tensor, expected: torch.Tensor) -> bool:
    error = relative_error(actual, expected)
    ok = actual.shape == expected.shape and error <= TOLERANCE
    verdict = "ok  " if ok else "FAIL"
    print(f"{verdict} {what}: shape {tuple(actual.shape)}, relative error {error:.2e}")
    return ok


def run(command: list[str]) -> None:
    print("$", " ".join(command))
    subprocess.run(command, check=True)


def check_inference(fmt: str, runner: str, work: Path) -> bool:
    model = build_model().eval()
    file_name, export = EXPORTS[fmt]
    export(model, work / file_name)
    ok = True
    for batch in BATCH_SIZES:
        x = torch.randn(batch, IN_FEATURES)
        torch.save(x, work / "input.pt")
        run([runner, str(work / file_name), str(work / "input.pt"), str(work / "output.pt")])
        with torch.no_grad():
            expected = model(x)
        ok &= check(f"{fmt} batch {batch}", torch.load(work / "output.pt"), expected)
    return ok


def check_training(trainer: str, work: Path) -> bool:
    model = build_model().train()
    export_torchscript(model, work / "model.pt")
    x, target = (
        torch.randn(BATCH_SIZES[-1], IN_FEATURES),
        torch.randn(BATCH_SIZES[-1], OUT_FEATURES),
    )
    torch.save(x, work / "input.pt")
    torch.save(target, work / "target.pt")
    run(
        [
            trainer,
            str(work / "model.pt"),
            str(work / "input.pt"),
            str(work / "target.pt"),
            str(LEARNING_RATE),
            str(work / "after.pt"),
        ]
    )
    loss = (model(x) - target).square().mean()
    loss.backward()
    # A dict pickled by C++ carries its key and value types (restore_type_tag).
    with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
        after = torch.load(work / "after.pt")
    ok = check("loss", after.pop("loss"), loss.detach())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            ok &= check(name, after.pop(name), parameter - LEARNING_RATE * parameter.grad)
    if after:
        print(f"FAIL parameters only C++ has: {sorted(after)}")
    return ok and not after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=("torchscript", "aoti", "train"))
    parser.add_argument("--run-model", required=True, help="the run_model program")
    parser.add_argument("--train-step", required=True, help="the train_step program")
    parser.add_argument("--work", type=Path, required=True, help="directory for model files")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    if args.check == "train":
        ok = check_training(args.train_step, args.work)
    else:
        ok = check_inference(args.check, args.run_model, args.work)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
