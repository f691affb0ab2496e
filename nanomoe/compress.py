"""``nanomoe compress``: replace a saved model's dense layers by NanoMoE and save the result.

nanomoe compress path/to/hf-model --budget 0.25 --include mlp --out compressed/
nanomoe compress model.pt --budget 0.125 --mixing diagonal --out model-nanomoe.pt --report r.json

A Hugging Face directory (one with a config.json) is loaded with ``transformers`` from local files
only and saved with ``save_pretrained``: its config lists the NanoMoE layers (under ``"nanomoe"``)
and maps transformers' Auto classes to a two-line ``modeling_nanomoe.py`` that puts them in, so
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` (or whichever Auto class fits
the model) reads it back, as does ``nanomoe.compress.load(out)`` without running that file. A file
saved with ``torch.save(module)`` is saved the same way, and ``torch.load`` (or ``load``) reads it.
"""

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from nanomoe.budget import MIXINGS, BlockCount
from nanomoe.fit import DEFAULT_ITERS
from nanomoe.layers import NanoMoELinear
from nanomoe.replace import INITS, CompressionReport, replace_linear

MODELING = "modeling_nanomoe.py"
FORMAT = 2  # of the config's "nanomoe" entry

# The modeling file of a saved directory, for transformers' trust_remote_code: each class the
# config's auto_map names, built by nanomoe_model_class. __name__ makes it the class's module.
MODELING_HEADER = '''"""Written by nanomoe compress: {architecture} with the NanoMoE layers listed
under "nanomoe" in config.json. Needs the nanomoe package."""

import transformers

from nanomoe.compress import nanomoe_model_class

'''

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
    # sentence-transformers: its modules, and their folders (1_Pooling, 2_Normalize, ...)
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "[0-9]*_*",
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
    model = _load_hugging_face(model_path, progress) if hugging_face else _load_module(model_path)
    report = replace_linear(model, progress=progress, **options)
    _step(progress, f"saving to {out}")
    if hugging_face:
        save(model, out, progress)
        for pattern in COPIED:  # the tokenizer and the like
            for path in model_path.glob(pattern):
                if path.is_dir():
                    shutil.copytree(path, out / path.name, dirs_exist_ok=True)
                elif path.is_file():
                    shutil.copy2(path, out / path.name)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model, out)
    return model, report


def load(path: Union[str, Path]) -> nn.Module:
    """A model saved by ``nanomoe compress`` (or ``save``): a directory through ``from_pretrained``
    of its architecture with the NanoMoE layers its config lists (``nanomoe_model_class``; the
    directory's own modeling file is not run), a file through ``torch.load``."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, weights_only=False, map_location="cpu")
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    recorded = getattr(config, "nanomoe", None)
    if not isinstance(recorded, dict) or recorded.get("format") != FORMAT:
        found = recorded.get("format") if isinstance(recorded, dict) else None
        raise ValueError(
            f"{path / 'config.json'} has no nanomoe entry of format {FORMAT} (found {found!r}): "
            "not a directory written by this version of nanomoe compress"
        )
    base = _known_architecture(transformers, recorded["architecture"])
    model = nanomoe_model_class(base).from_pretrained(
        path, local_files_only=True, **_saved_dtype(transformers)
    )
    return model.eval()  # as from_pretrained returns it: dropout off


def nanomoe_model_class(base: type, module: str = __name__, prefix: str = "") -> type:
    """``base`` (a ``transformers`` model class) whose ``__init__`` then puts NanoMoE layers of the
    recorded shapes where ``config.nanomoe["layers"]`` says, for ``from_pretrained`` to load the
    compressed weights into, and whose ``save_pretrained`` also writes the modeling file.

    ``prefix``: ``base`` is the base model inside the saved architecture, under that attribute
    (``transformer`` of ``GPT2LMHeadModel``), as ``AutoModel`` loads it: the layers under it are
    put in with the prefix taken off, the others (the head's) left out. ``module`` becomes the
    class's ``__module__``.
    """

    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        for layer in config.nanomoe["layers"]:
            name = layer["name"]
            if prefix:
                if not name.startswith(prefix + "."):
                    continue
                name = name[len(prefix) + 1 :]
            parent, _, child = name.rpartition(".")
            new_layer = NanoMoELinear(
                layer["in_features"],
                layer["out_features"],
                layer["rank"],
                tuple(layer["num_blocks"]),
                layer["mixing"],
                bias=layer["bias"],
            )
            setattr(self.get_submodule(parent), child, new_layer)

    def save_pretrained(
        self: Any, save_directory: Union[str, Path], *args: Any, **kwargs: Any
    ) -> Any:
        result = base.save_pretrained(self, save_directory, *args, **kwargs)
        architecture = self.config.nanomoe["architecture"]
        classes = _auto_classes(_transformers(), self.config, architecture)
        _write_modeling(architecture, classes, Path(save_directory))
        return result

    namespace = {"__init__": __init__, "save_pretrained": save_pretrained, "__module__": module}
    return type(f"NanoMoE{base.__name__}", (base,), namespace)


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
    try:
        return _known_architecture(transformers, name)
    except ValueError:
        return transformers.AutoModel


def _known_architecture(transformers: Any, name: Optional[str]) -> type:
    model_class = getattr(transformers, name, None) if name else None
    if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
        return model_class
    raise ValueError(f"transformers has no model class {name!r}")


def _auto_classes(
    transformers: Any, config: Any, architecture: str
) -> Dict[str, Tuple[str, str, str]]:
    """For each Auto class (``AutoModelForCausalLM``, ...) that builds ``architecture`` from this
    config, and for ``AutoModel`` in any case: the NanoMoE class it is to load, the transformers
    class that one extends, and the prefix of the base model inside the architecture (empty when
    the class is the architecture itself)."""

    def model_class(auto: str) -> Optional[type]:
        try:  # _model_mapping: config class -> model class, imported lazily
            found = getattr(transformers, auto)._model_mapping[type(config)]
        except (AttributeError, KeyError, ImportError, ValueError):
            return None
        return found if isinstance(found, type) else None

    classes = {}
    for auto in dir(transformers):
        found = model_class(auto) if auto.startswith("AutoModel") else None
        if found is not None and found.__name__ == architecture:
            classes[auto] = (f"NanoMoE{architecture}", architecture, "")
    base = model_class("AutoModel")
    prefix = getattr(_known_architecture(transformers, architecture), "base_model_prefix", "")
    if "AutoModel" not in classes and base is not None and prefix:
        classes["AutoModel"] = (f"NanoMoE{base.__name__}", base.__name__, prefix)
    return classes or {"AutoModel": (f"NanoMoE{architecture}", architecture, "")}


def _load_hugging_face(path: Path, progress: bool) -> nn.Module:
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    architectures = getattr(config, "architectures", None) or [None]
    with _progress_bars(transformers, progress):
        model = _architecture(transformers, architectures[0]).from_pretrained(
            path, local_files_only=True
        )
    return model


@contextlib.contextmanager
def _progress_bars(transformers: Any, progress: bool) -> Iterator[None]:
    """transformers' own bars ("Loading weights", "Writing model shards") only with
    ``progress``; the switch is global, so it is restored."""
    logging = transformers.utils.logging
    bars = logging.is_progress_bar_enabled()
    if not progress:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            logging.enable_progress_bar()


def _load_module(path: Path) -> nn.Module:
    # weights_only=False unpickles arbitrary code: the command is meant for the user's own files.
    model = torch.load(path, weights_only=False, map_location="cpu")
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{path} holds a {type(model).__name__}, not an nn.Module: save the module itself "
            "(torch.save(model, path)), or pass a Hugging Face model directory"
        )
    return model


def save(model: nn.Module, out: Union[str, Path], progress: bool = False) -> None:
    """Save a ``transformers`` model whose layers ``replace_linear`` replaced with
    ``save_pretrained``: its config (on disk) lists every NanoMoE layer of the model and maps the
    Auto classes to a modeling file that puts them in, so that ``from_pretrained(out,
    trust_remote_code=True)`` and ``load(out)`` read it back. The model itself is left as it is.
    """
    transformers = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"save takes a transformers model, got {type(model).__name__}")
    config: Any = model.config
    # The transformers class it is (or, built by load or from_pretrained, extends).
    architecture = next(
        (c.__name__ for c in type(model).__mro__ if getattr(transformers, c.__name__, None) is c),
        None,
    )
    _known_architecture(transformers, architecture)  # the modeling file names it
    layers = _nanomoe_layers(model)
    kept = {key: getattr(config, key) for key in ("nanomoe", "auto_map") if hasattr(config, key)}
    config.nanomoe = {"format": FORMAT, "architecture": architecture, "layers": layers}
    classes = _auto_classes(transformers, config, architecture)
    config.auto_map = {
        auto: f"{MODELING.removesuffix('.py')}.{class_name}"
        for auto, (class_name, _, _) in classes.items()
    }
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _progress_bars(transformers, progress):
            model.save_pretrained(out)
        _write_modeling(architecture, classes, out)
    finally:  # the caller's config as it was: its auto_map would name a file only out has
        for key in ("nanomoe", "auto_map"):
            if key in kept:
                setattr(config, key, kept[key])
            else:
                delattr(config, key)


def _nanomoe_layers(model: nn.Module) -> List[Dict[str, Any]]:
    """Every NanoMoE layer of the model, by name and shape; one under two names cannot be saved
    (safetensors refuses tensors shared between keys)."""
    names = _module_names(model)
    layers = []
    for name, layer in model.named_modules():
        if not isinstance(layer, NanoMoELinear):
            continue
        if len(names[id(layer)]) > 1:
            raise ValueError(
                f"the NanoMoE layer {name} is shared with {names[id(layer)][1:]}: "
                "save_pretrained cannot store tensors shared between names (torch.save the model)"
            )
        layers.append(
            {
                "name": name,
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "rank": layer.rank,
                "num_blocks": list(layer.num_blocks),
                "mixing": layer.mixing,
                "bias": layer.bias is not None,
            }
        )
    return layers


def _write_modeling(architecture: str, classes: Dict[str, Tuple[str, str, str]], out: Path) -> None:
    """The modeling file the config's auto_map names: the NanoMoE class of each Auto class
    (``classes``, from ``_auto_classes``)."""
    lines = {
        f"{class_name} = nanomoe_model_class(transformers.{base}, __name__"
        + (f", prefix={prefix!r})" if prefix else ")")
        for class_name, base, prefix in classes.values()
    }
    source = MODELING_HEADER.format(architecture=architecture) + "\n".join(sorted(lines)) + "\n"
    (out / MODELING).write_text(source)


def _saved_dtype(transformers: Any) -> Dict[str, str]:
    """from_pretrained's option for the dtype the weights were saved in (the default only in
    transformers 5; named torch_dtype before 4.56)."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": "auto"}


def _module_names(model: nn.Module) -> Dict[int, List[str]]:
    names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


if __name__ == "__main__":
    main()
