"""Export a small model built with NanoMoE layers for deployment without Python, two ways:

- TorchScript: ``torch.jit.script`` + ``save`` -> ``model.pt``, loaded by ``torch::jit::load``;
- torch.export + AOTInductor: ``aoti_compile_and_package`` -> ``model.pt2`` (compiled C++ with a
  dynamic batch size), loaded by ``torch::inductor::AOTIModelPackageLoader``.

Both call ``nanomoe::linear`` through the dispatcher at run time, so the C++ process must load the
op library (``nanomoe_ops``, see examples/cpp). The model mixes every NanoMoE variant with
``nn.Linear`` and activations; its weights come from a fixed seed, and ``--state`` saves them so a
check can rebuild the same model in Python.

    python examples/export_model.py --out build/deploy            # both formats
    python examples/export_model.py --out build/deploy --formats torchscript
"""

import argparse
from pathlib import Path

import torch
from torch import nn

import nanomoe

IN_FEATURES = 48
OUT_FEATURES = 24


def build_model(seed: int = 0) -> nn.Sequential:
    """Every NanoMoE variant between nn.Linear layers and activations (float32, CPU)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nanomoe.NanoMoELinear(IN_FEATURES, 64, rank=8, num_blocks=4, mixing="scalar"),
        nn.GELU(),
        nanomoe.NanoMoELinear(64, 64, rank=6, num_blocks=(2, 4), mixing="diagonal"),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.Tanh(),
        nanomoe.NanoMoELinear(32, 32, rank=4, num_blocks=4, mixing="diagonal_outer"),
        nn.SiLU(),
        nanomoe.NanoMoELinear(32, OUT_FEATURES, rank=4, num_blocks=2, mixing="full"),
    )


def export_torchscript(model: nn.Module, path: Path) -> None:
    torch.jit.script(model).save(str(path))


def export_aoti(model: nn.Module, path: Path) -> None:
    """torch.export with a dynamic batch dimension, then AOTInductor into a .pt2 package."""
    example = torch.randn(4, IN_FEATURES)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the model files")
    parser.add_argument(
        "--formats", nargs="+", choices=("torchscript", "aoti"), default=["torchscript", "aoti"]
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.seed).eval()
    torch.save(model.state_dict(), args.out / "state_dict.pt")
    if "torchscript" in args.formats:
        export_torchscript(model, args.out / "model.pt")
        print(f"wrote {args.out / 'model.pt'} (TorchScript)")
    if "aoti" in args.formats:
        export_aoti(model, args.out / "model.pt2")
        print(f"wrote {args.out / 'model.pt2'} (AOTInductor package)")


if __name__ == "__main__":
    main()
