"""``nanomoe compress``: replace a saved model's dense layers by NanoMoE and save the result.

nanomoe compress path/to/hf-model --budget 0.25 --include mlp --out compressed/
nanomoe compress model.pt --budget 0.125 --mixing diagonal --out model-nanomoe.pt --report r.json

A Hugging Face directory (one with a config.json) is loaded with ``transformers`` from local files
only and saved as its config, the compressed state_dict and ``nanomoe_compress.json``, the layers
replaced; ``nanomoe.compress.load(out)`` rebuilds it. A file saved with ``torch.save(module)`` is
saved the same way, and ``torch.load`` (or ``load``) reads it back.
"""

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from nanomoe.budget import MIXINGS, BlockCount
from nanomoe.fit import DEFAULT_ITERS
from nanomoe.layers import NanoMoELinear
from nanomoe.replace import INITS, CompressionReport, replace_linear

METADATA = "nanomoe_compress.json"
WEIGHTS = "nanomoe_model.pt"
FORMAT = 1

# Files of a Hugging Face directory copied to the output as they are: they do not depend on the
# weights (tokenizer, generation settings), and a model is of little use without its tokenizer.
COPIED = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "preprocessor_config.json",
    "*.model",  # sentencepiece
    "*.tiktoken",
)


def block_count(text: str) -> Union[BlockCount, str]:
    """``auto``, ``K``, or ``K_OUTxK_IN`` (as the report's table writes a pair)."""
    if text == "auto":
        return text
    try:
        parts = [int(part) for part in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"expected 'auto', K or K_OUTxK_IN, got {text!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanomoe compress", description=__doc__.split("\n")[0])
    p.add_argument(
        "model",
        type=Path,
        help="a Hugging Face model directory (with config.json), or a torch.save'd nn.Module",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory (Hugging Face model) or file (torch.save'd module)",
    )
    p.add_argument(
        "--budget",
        type=float,
        required=True,
        help="fraction in (0, 1] of each replaced layer's parameters (or multiply-adds)",
    )
    p.add_argument("--mixing", choices=MIXINGS, default="scalar")
    p.add_argument("--num-blocks", type=block_count, default="auto", help="auto, K or K_OUTxK_IN")
    p.add_argument("--include", help="regular expression: replace only layers whose name matches")
    p.add_argument("--exclude", help="regular expression: leave layers whose name matches")
    p.add_argument("--init", choices=INITS, default="fit")
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS, help="fit_dense iterations")
    p.add_argument("--budget-metric", choices=("params", "macs"), default="params")
    p.add_argument("--report", type=Path, help="also write the report as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or step messages")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if not args.model.exists():
        p.error(f"{args.model} does not exist")
    if args.model.is_dir() and not (args.model / "config.json").is_file():
        p.error(f"{args.model} is a directory without config.json: not a Hugging Face model")
    try:
        _, report = compress(
            args.model,
            args.out,
            budget=args.budget,
            mixing=args.mixing,
            num_blocks=args.num_blocks,
            include=args.include,
            exclude=args.exclude,
            init=args.init,
            iters=args.iters,
            budget_metric=args.budget_metric,
            progress=not args.no_progress,
        )
    except (OSError, ValueError, TypeError) as error:  # bad file, bad option: no traceback
        raise SystemExit(f"nanomoe compress: error: {error}") from None
    print(report)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report_dict(report), indent=2) + "\n")
        print(f"wrote {args.report}")


def compress(
    model_path: Path, out: Path, *, progress: bool = True, **options: Any
) -> Tuple[nn.Module, CompressionReport]:
    """Load ``model_path``, ``replace_linear(model, **options)``, save to ``out``; returns the
    compressed model and the report."""
    model_path, out = Path(model_path), Path(out)
    hugging_face = model_path.is_dir()
    _step(progress, f"loading {model_path}")
    if hugging_face:
        model, architecture = _load_hugging_face(model_path, progress)
    else:
        model, architecture = _load_module(model_path), None
    report = replace_linear(model, progress=progress, **options)
    _step(progress, f"saving to {out}")
    if hugging_face:
        _save_hugging_face(model, architecture, report, options, model_path, out)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model, out)
    return model, report


def load(path: Union[str, Path]) -> nn.Module:
    """A model saved by ``nanomoe compress``: a directory is rebuilt from its config (random
    weights), its recorded layers replaced by NanoMoE ones of the recorded shapes, then its
    state_dict loaded; a file is ``torch.load``ed."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, weights_only=False, map_location="cpu")
    metadata = json.loads((path / METADATA).read_text())
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path / METADATA} has format {metadata.get('format')!r}, not {FORMAT}")
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    model = _architecture(transformers, metadata["architecture"]).from_config(config)
    model.to(getattr(torch, metadata["dtype"]))
    names = _module_names(model)
    for layer in metadata["layers"]:
        dense = model.get_submodule(layer["name"])
        new_layer = NanoMoELinear(
            layer["in_features"],
            layer["out_features"],
            layer["rank"],
            tuple(layer["num_blocks"]),
            layer["mixing"],
            bias=layer["bias"],
            dtype=getattr(torch, metadata["dtype"]),
        )
        for name in names[id(dense)]:  # a shared layer stays shared, as replace_linear keeps it
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new_layer)
    state = torch.load(path / WEIGHTS, weights_only=True, map_location="cpu")
    model.load_state_dict(state)
    return model.eval()  # as from_pretrained returns it: dropout off


def report_dict(report: CompressionReport) -> Dict[str, Any]:
    """The report as JSON-ready data: every LayerReport field per layer, then the totals."""
    return {
        "layers": [
            {**dataclasses.asdict(layer), "replaced": layer.replaced} for layer in report.layers
        ],
        "params_before": report.params_before,
        "params_after": report.params_after,
        "model_params_before": report.model_params_before,
        "model_params_after": report.model_params_after,
        "budget": report.budget,
        "budget_metric": report.budget_metric,
        "mixing": report.mixing,
        "init": report.init,
    }


def _step(progress: bool, message: str) -> None:
    if progress:
        print(f"nanomoe compress: {message}", file=sys.stderr, flush=True)


def _transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError:
        raise OSError(
            "a Hugging Face model needs transformers (pip install transformers)"
        ) from None
    return transformers


def _architecture(transformers: Any, name: Optional[str]) -> Any:
    """The class named in the config's ``architectures`` (``GPT2LMHeadModel``: with its head), or
    ``AutoModel`` when there is none or ``transformers`` does not know it."""
    model_class = getattr(transformers, name, None) if name else None
    if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
        return _FromConfig(model_class)
    return transformers.AutoModel


class _FromConfig:
    """``AutoModel``'s ``from_config``/``from_pretrained`` pair, for a concrete class."""

    def __init__(self, model_class: Any) -> None:
        self.model_class = model_class

    def from_config(self, config: Any) -> nn.Module:
        return self.model_class._from_config(config)

    def from_pretrained(self, path: Path, **kwargs: Any) -> nn.Module:
        return self.model_class.from_pretrained(path, **kwargs)


def _load_hugging_face(path: Path, progress: bool) -> Tuple[nn.Module, str]:
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    architectures = getattr(config, "architectures", None) or [None]
    logging = transformers.utils.logging
    bars = logging.is_progress_bar_enabled()
    if not progress:  # transformers' own "Loading weights" bar; its switch is global: restored
        logging.disable_progress_bar()
    try:
        model = _architecture(transformers, architectures[0]).from_pretrained(
            path, local_files_only=True
        )
    finally:
        if bars:
            logging.enable_progress_bar()
    return model, type(model).__name__  # what load rebuilds, whichever class loaded it


def _load_module(path: Path) -> nn.Module:
    # weights_only=False unpickles arbitrary code: the command is meant for the user's own files.
    model = torch.load(path, weights_only=False, map_location="cpu")
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{path} holds a {type(model).__name__}, not an nn.Module: save the module itself "
            "(torch.save(model, path)), or pass a Hugging Face model directory"
        )
    return model


def _save_hugging_face(
    model: nn.Module,
    architecture: str,
    report: CompressionReport,
    options: Dict[str, Any],
    source: Path,
    out: Path,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)  # type: ignore[operator]
    for pattern in COPIED:
        for file in source.glob(pattern):
            if file.is_file():
                shutil.copy2(file, out / file.name)
    # A plain state_dict, not save_pretrained's: its keys are the NanoMoE factors, which
    # from_pretrained of the dense architecture would drop with a warning. torch.save rather
    # than safetensors, which refuses tied weights (GPT-2's lm_head and embedding).
    torch.save(model.state_dict(), out / WEIGHTS)
    dtype = next(model.parameters()).dtype
    layers = []
    for layer in report.replaced:
        new_layer = model.get_submodule(layer.name)
        assert isinstance(new_layer, NanoMoELinear)
        layers.append(
            {
                "name": layer.name,
                "in_features": new_layer.in_features,
                "out_features": new_layer.out_features,
                "rank": new_layer.rank,
                "num_blocks": list(new_layer.num_blocks),
                "mixing": new_layer.mixing,
                "bias": new_layer.bias is not None,
            }
        )
    metadata = {
        "format": FORMAT,
        "architecture": architecture,
        "dtype": str(dtype).removeprefix("torch."),
        "options": {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in options.items()
        },
        "layers": layers,
    }
    (out / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")


def _module_names(model: nn.Module) -> Dict[int, List[str]]:
    names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


if __name__ == "__main__":
    main()
