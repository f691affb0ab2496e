"""How long ``nanomoe.fit_dense`` takes on a large weight, and what it gains over truncated SVD.

For each weight kind and mixing: the layer's rank at the parameter budget (bias included, as
``replace_linear`` counts it), the time of the SVD start alone (``iters=0``), the time of the
whole fit with its defaults, the iterations it ran, and the relative Frobenius error of the
start (truncated SVD's) and of the fit. Weight kinds:

- ``gaussian``: i.i.d. normal, a flat spectrum, no structure to find (the slowest case for the
  SVD start, and where ALS gains least);
- ``decaying``: singular values ``i^-0.7`` between random orthonormal bases, closer to a trained
  layer's spectrum.

    python benchmarks/fit_speed.py                      # 4096 x 4096, budget 1/8, K = 8
    python benchmarks/fit_speed.py --size 1024 --blocks 16 --mixings scalar diagonal
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from report import machine_info
from timing import copy_gb_per_s
from torch import Tensor
from tqdm import tqdm

import nanomoe
from nanomoe.budget import MIXINGS, dense_params, nanomoe_rank_for_budget
from nanomoe.fit import DEFAULT_ITERS, DenseFit

ROOT = Path(__file__).resolve().parent
WEIGHTS = ("gaussian", "decaying")


def make_weight(kind: str, size: int, seed: int = 0) -> Tensor:
    """A float32 ``size x size`` weight of the given kind (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)

    def normal() -> Tensor:
        return torch.randn(size, size, generator=generator, dtype=torch.float64)

    if kind == "gaussian":
        return (normal() / size**0.5).float()
    left, right = torch.linalg.qr(normal()).Q, torch.linalg.qr(normal()).Q
    values = torch.arange(1, size + 1, dtype=torch.float64) ** -0.7
    return (left * values @ right.T).float()


def timed_fit(
    weight: Tensor, rank: int, blocks: int, mixing: str, iters: int
) -> Tuple[DenseFit, float]:
    start = time.perf_counter()
    fit = nanomoe.fit_dense(weight, rank, blocks, mixing, iters=iters)
    if weight.is_cuda:
        torch.cuda.synchronize()
    return fit, time.perf_counter() - start


def measure(args: argparse.Namespace) -> List[Dict[str, Any]]:
    budget = round(args.budget * dense_params(args.size, args.size))
    cases = [(kind, mixing) for kind in args.weights for mixing in args.mixings]
    rows = []
    for kind, mixing in tqdm(cases, desc="fits", unit="fit"):
        weight = make_weight(kind, args.size).to(args.device)
        rank = nanomoe_rank_for_budget(args.size, args.size, budget, args.blocks, mixing)
        _, start_s = timed_fit(weight, rank, args.blocks, mixing, iters=0)
        fit, fit_s = timed_fit(weight, rank, args.blocks, mixing, iters=args.iters)
        iterations = len(fit.errors) - 1
        rows.append(
            {
                "weight": kind,
                "mixing": mixing,
                "rank": rank,
                "blocks": args.blocks,
                "start_s": start_s,
                "fit_s": fit_s,
                "iterations": iterations,
                "per_iteration_s": (fit_s - start_s) / iterations if iterations else None,
                "svd_error": fit.errors[0],
                "fit_error": fit.errors[-1],
                "fit_vs_svd": fit.errors[-1] / fit.errors[0] if fit.errors[0] else None,
            }
        )
    return rows


def print_table(rows: List[Dict[str, Any]]) -> None:
    header = (
        f"{'weight':<10}{'mixing':<16}{'rank':>6}{'start s':>9}{'fit s':>8}{'iters':>7}"
        f"{'s/iter':>8}{'SVD error':>11}{'fit error':>11}{'fit/SVD':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        per_iteration = row["per_iteration_s"]
        print(
            f"{row['weight']:<10}{row['mixing']:<16}{row['rank']:>6}{row['start_s']:>9.1f}"
            f"{row['fit_s']:>8.1f}{row['iterations']:>7}"
            f"{'-' if per_iteration is None else f'{per_iteration:.2f}':>8}"
            f"{row['svd_error']:>11.4f}{row['fit_error']:>11.4f}{row['fit_vs_svd']:>9.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="in = out features")
    parser.add_argument("--budget", type=float, default=1 / 8, help="fraction of dense params")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--mixings", nargs="+", default=list(MIXINGS), choices=MIXINGS)
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=WEIGHTS)
    parser.add_argument("--iters", type=int, default=DEFAULT_ITERS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="default: results/fit-<device type>.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    out: Path = args.out or ROOT / "results" / f"fit-{device.type}.json"
    info = machine_info(device, torch.get_num_threads(), copy_gb_per_s(device, 64, 5, 1.0), 64)
    info.update(size=args.size, budget=args.budget, blocks=args.blocks)
    rows = measure(args)
    print(
        f"fit_dense, {args.size} x {args.size}, budget {args.budget:g} of dense, K = {args.blocks}"
    )
    print_table(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
