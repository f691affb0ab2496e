"""Compress a model in place: its ``nn.Linear`` layers (and GPT-2's ``Conv1D``) become NanoMoE.

``replace_linear`` picks layers by name, sizes each to a fraction of its parameters with the budget
helpers, initializes it from the dense weight (``fit_dense``, SPEC section 6) or at random, and
reports what each layer cost and how far its weight moved, next to truncated SVD at the same
budget, the baseline NanoMoE has to beat.
"""

import math
import re
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Literal, NamedTuple, Optional, Pattern, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from tqdm import tqdm

from nanomoe.budget import (
    MIXINGS,
    BlockCount,
    Metric,
    Mixing,
    absolute_budget,
    auto_config,
    block_pair,
    check_metric,
    dense_params,
    lowrank_rank_for_budget,
    nanomoe_params,
    nanomoe_rank_for_budget,
)
from nanomoe.fit import DEFAULT_ITERS, fit_dense
from nanomoe.layers import NanoMoELinear
from nanomoe.reference import nanomoe_linear_reference

Init = Literal["fit", "random"]
INITS: Tuple[Init, ...] = ("fit", "random")

# The dtypes the compiled operator runs in, by device type (SPEC section 3). A layer elsewhere is
# skipped: replacing it would leave a model that fails on its first forward pass.
SUPPORTED_DTYPES: Dict[str, Tuple[torch.dtype, ...]] = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}

# Candidate names listed in the error for a selection that matches nothing.
NAMES_SHOWN = 20

# Input columns per step when measuring a new layer's error (_nanomoe_error).
COLUMN_CHUNK = 1024


@dataclass(frozen=True)
class LayerReport:
    """One selected layer: what it cost before and after, and how far its weight moved.

    Errors are relative Frobenius errors ``||W - W_approx||_F / ||W||_F`` against the dense weight,
    in float64. ``nanomoe_error`` is that of the installed layer (its parameters as stored, so
    rounded to the model's dtype); ``svd_error`` is that of truncated SVD at ``svd_rank``, the
    largest ``LowRankLinear`` rank within the same budget (at least ``rank``: low-rank has no gate
    to pay for). Skipped layers have ``skipped`` set, ``params_after == params_before`` and
    ``None`` for what was not computed.
    """

    name: str
    kind: str  # the replaced module's class name: "Linear", "Conv1D", ...
    in_features: int
    out_features: int
    params_before: int
    params_after: int
    rank: Optional[int] = None
    num_blocks: Optional[Tuple[int, int]] = None  # (K_out, K_in)
    mixing: Optional[str] = None
    nanomoe_error: Optional[float] = None
    svd_rank: Optional[int] = None
    svd_error: Optional[float] = None
    skipped: Optional[str] = None  # why the layer was left as it is

    @property
    def replaced(self) -> bool:
        return self.skipped is None


@dataclass(frozen=True)
class CompressionReport:
    """What ``replace_linear`` did; ``print(report)`` shows it as a table."""

    layers: Tuple[LayerReport, ...]  # every selected layer, replaced or skipped, in model order
    model_params_before: int  # unique parameters of the whole model
    model_params_after: int
    budget: float
    budget_metric: str
    mixing: str
    init: str

    @property
    def replaced(self) -> List[LayerReport]:
        return [layer for layer in self.layers if layer.replaced]

    @property
    def skipped(self) -> List[LayerReport]:
        return [layer for layer in self.layers if not layer.replaced]

    @property
    def params_before(self) -> int:
        """Parameters of the replaced layers before replacement."""
        return sum(layer.params_before for layer in self.replaced)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.replaced)

    def table(self) -> str:
        """One aligned row per selected layer."""
        header = (
            "layer",
            "kind",
            "in->out",
            "params",
            "after",
            "ratio",
            "blocks",
            "rank",
            "NanoMoE err",
            "SVD rank",
            "SVD err",
            "note",
        )
        rows = [header, *(_table_row(layer) for layer in self.layers)]
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        left_aligned = {0, 1, len(header) - 1}
        lines = []
        for row in rows:
            cells = [
                cell.ljust(width) if column in left_aligned else cell.rjust(width)
                for column, (cell, width) in enumerate(zip(row, widths))
            ]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)

    def summary(self) -> str:
        budget = f"{self.budget:g} of each layer's {self.budget_metric}"
        return (
            f"NanoMoE {self.mixing}, init {self.init}, budget {budget}: replaced "
            f"{len(self.replaced)} of {len(self.layers)} selected layers, their parameters "
            f"{self.params_before:,} -> {self.params_after:,} "
            f"({_percent(self.params_after, self.params_before)}); whole model "
            f"{self.model_params_before:,} -> {self.model_params_after:,} "
            f"({_percent(self.model_params_after, self.model_params_before)})"
        )

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"


def replace_linear(
    model: nn.Module,
    *,
    budget: float,
    mixing: Mixing = "scalar",
    num_blocks: Union[BlockCount, str] = "auto",
    include: Optional[str] = None,
    exclude: Optional[str] = None,
    init: Init = "fit",
    iters: int = DEFAULT_ITERS,
    budget_metric: Metric = "params",
    progress: bool = True,
) -> CompressionReport:
    """Replace ``model``'s ``nn.Linear`` layers (and ``transformers``' ``Conv1D``) by
    ``NanoMoELinear`` in place, and report per layer what it cost and how close it stays.

    Args:
        model: any ``nn.Module``; the layers are swapped in their parents (``setattr``), so the
            model object stays the same.
        budget: a fraction in ``(0, 1]`` of each layer's parameters (bias counted), or with
            ``budget_metric="macs"`` of its multiply-adds per token.
        mixing: the gate variant, as in ``NanoMoELinear``.
        num_blocks: ``K``, a pair ``(K_out, K_in)``, or ``"auto"`` for
            ``nanomoe.budget.auto_config``'s rule per layer. With a fixed count the rank is the
            largest within budget.
        include, exclude: regular expressions searched (``re.search``) in each layer's qualified
            name from ``model.named_modules()``; a layer is selected if ``include`` (default: any)
            matches and ``exclude`` (default: none) does not. ``r"mlp"`` selects every layer under
            a module named ``mlp``; anchor with ``^`` and ``$`` for exact names.
        init: ``"fit"``: ``fit_dense`` of the dense weight, never worse than truncated SVD at the
            same rank; ``"random"``: ``NanoMoELinear``'s default initialization, for training from
            scratch. The bias is copied either way.
        iters: alternating least-squares iterations of ``fit_dense``.
        progress: show a progress bar over the selected layers.

    Returns:
        A ``CompressionReport`` with one ``LayerReport`` per selected layer.

    Raises:
        ValueError: a bad option, or a selection with no layer in it (the message lists the
            candidates). Options are checked before anything is changed, and every new layer is
            built before the first is installed, so an error (or Ctrl-C) leaves the model as it
            was.

    Each new layer has the replaced one's dtype, device, training mode and ``requires_grad``.
    A selected layer is skipped, with the reason in its report, where no NanoMoE configuration fits
    its budget or block count, where its dtype or device is not one the operator supports, where
    its weight is tied to another module (a language model's output layer sharing the embedding),
    where it belongs to ``nn.MultiheadAttention`` (which reads the weight directly), or where it
    is the model itself. A warning says so if nothing was replaced. Forward and backward hooks
    registered on a replaced layer carry over to its NanoMoE layer (their handles still remove
    them). A ``transformers`` model's own ``save_pretrained`` does not record the new layers:
    ``nanomoe.compress.save`` does, so that ``from_pretrained`` rebuilds them.
    """
    fraction = _check_options(model, budget, mixing, num_blocks, init, iters, budget_metric)
    select = _selector(include, exclude)
    candidates = _candidates(model)
    selected = [layer for layer in candidates if select(layer.names)]
    if not selected:
        raise ValueError(_nothing_selected(candidates, include, exclude))
    size = _Sizing(fraction, mixing, num_blocks, budget_metric)
    model_params_before = _count_params(model)
    reports, swaps = [], []
    bar = tqdm(selected, desc="replace_linear", unit="layer", disable=not progress)
    with torch.no_grad(), bar:
        for layer in bar:
            bar.set_postfix_str(layer.names[0], refresh=False)
            report, new_layer = _compress(layer, size, init, iters)
            reports.append(report)
            if new_layer is not None:
                swaps.append((layer, new_layer))
    for layer, new_layer in swaps:
        _carry_hooks(layer.module, new_layer)
        _install(model, layer.names, new_layer)
    if not swaps:
        warnings.warn("replace_linear replaced no layer; see the report for why", stacklevel=2)
    return CompressionReport(
        layers=tuple(reports),
        model_params_before=model_params_before,
        model_params_after=_count_params(model),
        budget=fraction,
        budget_metric=budget_metric,
        mixing=mixing,
        init=init,
    )


class _Candidate(NamedTuple):
    """A dense layer of the model: under every name it has (a shared module has several)."""

    names: Tuple[str, ...]
    module: nn.Module
    weight: Tensor  # (out_features, in_features) as in nn.Linear, a view of the module's own
    bias: Optional[Tensor]
    unsupported: Optional[str]  # why it cannot be replaced in place, whatever the budget


class _Sizing(NamedTuple):
    budget: float
    mixing: Mixing
    num_blocks: Union[BlockCount, str]
    metric: Metric


def _check_options(
    model: nn.Module,
    budget: float,
    mixing: str,
    num_blocks: Union[BlockCount, str],
    init: str,
    iters: int,
    metric: str,
) -> float:
    """Raise on a bad option before anything is touched; returns the budget as a float."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(
            f"budget must be a fraction in (0, 1] of each layer's parameters, got {budget!r}"
        )
    if mixing not in MIXINGS:
        raise ValueError(f"unknown mixing {mixing!r}; choose one of {', '.join(MIXINGS)}")
    if isinstance(num_blocks, str):
        if num_blocks != "auto":
            raise ValueError(f"num_blocks must be an int, a pair or 'auto', got {num_blocks!r}")
    else:
        block_pair(num_blocks)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    check_metric(metric)
    return float(budget)


class _Selector(NamedTuple):
    include: Optional[Pattern[str]]
    exclude: Optional[Pattern[str]]

    def __call__(self, names: Sequence[str]) -> bool:
        """Selected if ``include`` finds any of the layer's names and ``exclude`` none."""
        included = self.include is None or any(self.include.search(name) for name in names)
        excluded = self.exclude is not None and any(self.exclude.search(name) for name in names)
        return included and not excluded


def _selector(include: Optional[str], exclude: Optional[str]) -> _Selector:
    return _Selector(_compile("include", include), _compile("exclude", exclude))


def _compile(option: str, pattern: Optional[str]) -> Optional[Pattern[str]]:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ValueError(f"{option} must be a regular expression (a str), got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{option}={pattern!r} is not a regular expression: {error}") from None


def _nothing_selected(
    candidates: Sequence[_Candidate], include: Optional[str], exclude: Optional[str]
) -> str:
    if not candidates:
        return "the model has no nn.Linear (or transformers Conv1D) layer to replace"
    names = [layer.names[0] for layer in candidates]
    shown = ", ".join(names[:NAMES_SHOWN])
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return (
        f"include={include!r}, exclude={exclude!r} select none of the model's "
        f"{len(names)} dense layers: {shown}{more}"
    )


def _candidates(model: nn.Module) -> List[_Candidate]:
    """Every ``nn.Linear`` and ``Conv1D`` in ``model``, once each, in ``named_modules`` order."""
    names: Dict[int, List[str]] = {}
    modules: Dict[int, nn.Module] = {}
    parents: Dict[int, List[nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        modules[id(module)] = module
        for child in module.children():
            parents.setdefault(id(child), []).append(module)
    owners = _parameter_owners(model)
    candidates = []
    for key, module in modules.items():
        weight = _dense_weight(module)
        if weight is None:
            continue
        unsupported = _unsupported(module, names[key], parents.get(key, []), owners, names)
        bias = module.bias if isinstance(module.bias, Tensor) else None
        candidates.append(_Candidate(tuple(names[key]), module, weight, bias, unsupported))
    return candidates


def _dense_weight(module: nn.Module) -> Optional[Tensor]:
    """The weight as ``(out_features, in_features)`` if ``module`` is a layer this replaces."""
    if isinstance(module, nn.Linear):
        return module.weight
    conv1d = _gpt2_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.T  # Conv1D computes x @ weight + bias: its weight is (in, out)
    return None


def _gpt2_conv1d() -> Optional[type]:
    """``transformers``' ``Conv1D`` (GPT-2 and kin) if it is loaded. A model holding one has
    imported it already; importing ``transformers`` here would cost seconds and a dependency."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d if isinstance(conv1d, type) else None


def _parameter_owners(model: nn.Module) -> Dict[int, List[int]]:
    """For each parameter (by id), the modules (by id) that hold it directly."""
    owners: Dict[int, List[int]] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(id(module))
    return owners


def _unsupported(
    module: nn.Module,
    module_names: List[str],
    parents: List[nn.Module],
    owners: Dict[int, List[int]],
    names: Dict[int, List[str]],
) -> Optional[str]:
    """Why ``module`` cannot be swapped for another without breaking the model, if it cannot."""
    if "" in module_names:
        return "the model itself is this layer: there is no parent to replace it in"
    if any(isinstance(parent, nn.MultiheadAttention) for parent in parents):
        return "nn.MultiheadAttention reads this layer's weight directly"
    weight = module.weight
    assert isinstance(weight, Tensor)
    tied = [owner for owner in owners.get(id(weight), []) if owner != id(module)]
    if tied:
        return f"weight tied to {names[tied[0]][0] or 'the model'}"
    if not weight.is_floating_point():
        return f"weight of dtype {weight.dtype} is not floating point"
    if weight.dtype not in SUPPORTED_DTYPES.get(weight.device.type, ()):
        return f"nanomoe.linear does not run {weight.dtype} on {weight.device.type}"
    return None


def _compress(
    layer: _Candidate, size: _Sizing, init: str, iters: int
) -> Tuple[LayerReport, Optional[NanoMoELinear]]:
    """The report for one layer, and the layer to install (``None`` if skipped)."""
    out_features, in_features = layer.weight.shape
    kind = type(layer.module).__name__
    has_bias = layer.bias is not None
    params_before = dense_params(in_features, out_features, has_bias)

    def skipped(reason: str) -> Tuple[LayerReport, None]:
        sizes = (in_features, out_features, params_before, params_before)
        return LayerReport(layer.names[0], kind, *sizes, skipped=reason), None

    if layer.unsupported is not None:
        return skipped(layer.unsupported)
    try:
        rank, num_blocks = _choose_size(in_features, out_features, has_bias, size)
    except ValueError as error:
        return skipped(str(error))
    target = layer.weight.detach().to(torch.float64).contiguous()
    if not torch.isfinite(target).all():
        return skipped("weight has non-finite entries")
    new_layer = _new_layer(layer, rank, num_blocks, size.mixing)
    if init == "fit":
        _load_fit(new_layer, target, iters)
    limit = absolute_budget(in_features, out_features, size.budget, has_bias, size.metric)
    svd_rank = lowrank_rank_for_budget(in_features, out_features, limit, has_bias, size.metric)
    report = LayerReport(
        name=layer.names[0],
        kind=kind,
        in_features=in_features,
        out_features=out_features,
        params_before=params_before,
        params_after=nanomoe_params(
            in_features, out_features, rank, num_blocks, size.mixing, has_bias
        ),
        rank=rank,
        num_blocks=new_layer.num_blocks,
        mixing=size.mixing,
        nanomoe_error=_nanomoe_error(target, new_layer),
        svd_rank=svd_rank,
        svd_error=_svd_error(target, svd_rank),
    )
    return report, new_layer


def _choose_size(
    in_features: int, out_features: int, has_bias: bool, size: _Sizing
) -> Tuple[int, BlockCount]:
    """Rank and block count within budget; ``ValueError`` (with the reason) if none fits."""
    if isinstance(size.num_blocks, str):  # "auto"
        config = auto_config(
            in_features, out_features, size.budget, size.mixing, has_bias, size.metric
        )
        return config.rank, config.num_blocks
    limit = absolute_budget(in_features, out_features, size.budget, has_bias, size.metric)
    rank = nanomoe_rank_for_budget(
        in_features, out_features, limit, size.num_blocks, size.mixing, has_bias, size.metric
    )
    return rank, size.num_blocks


def _new_layer(
    layer: _Candidate, rank: int, num_blocks: BlockCount, mixing: Mixing
) -> NanoMoELinear:
    """A NanoMoE layer shaped, placed and flagged like ``layer``, its bias copied."""
    weight = layer.weight
    out_features, in_features = weight.shape
    new_layer = NanoMoELinear(
        in_features,
        out_features,
        rank,
        num_blocks,
        mixing,
        bias=layer.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    new_layer.train(layer.module.training)
    for parameter in new_layer.parameters():
        parameter.requires_grad_(weight.requires_grad)
    if layer.bias is not None and new_layer.bias is not None:
        new_layer.bias.copy_(layer.bias)
        new_layer.bias.requires_grad_(layer.bias.requires_grad)
    return new_layer


def _load_fit(new_layer: NanoMoELinear, target: Tensor, iters: int) -> None:
    """Set the factors to ``fit_dense``'s (they come back in float64: ``target``'s dtype)."""
    fit = fit_dense(target, new_layer.rank, new_layer.num_blocks, new_layer.mixing, iters)
    new_layer.down.copy_(fit.down)
    new_layer.mix.copy_(fit.mix)
    new_layer.up.copy_(fit.up)
    if new_layer.mix_left is not None and new_layer.mix_right is not None:
        assert fit.mix_left is not None and fit.mix_right is not None
        new_layer.mix_left.copy_(fit.mix_left)
        new_layer.mix_right.copy_(fit.mix_right)


def _nanomoe_error(target: Tensor, layer: NanoMoELinear) -> float:
    """Relative error of the layer's weight, from its parameters as stored (so with their
    rounding), in float64: the plain-PyTorch reference runs float64 on any device, the operator
    not on CUDA. Built COLUMN_CHUNK input columns at a time, so that no second weight-sized
    matrix (nor an identity as wide as the input) is ever held."""
    factors = [
        None if t is None else t.detach().to(torch.float64)
        for t in (layer.down, layer.mix, layer.up, layer.mix_left, layer.mix_right)
    ]
    down, mix, up, mix_left, mix_right = factors
    assert down is not None and mix is not None and up is not None
    in_features = target.shape[1]
    residual_sq = target.new_zeros(())
    for start in range(0, in_features, COLUMN_CHUNK):
        stop = min(start + COLUMN_CHUNK, in_features)
        basis = target.new_zeros(stop - start, in_features)
        basis[:, start:stop] = torch.eye(stop - start, dtype=target.dtype, device=target.device)
        columns = nanomoe_linear_reference(basis, down, mix, up, None, mix_left, mix_right)
        residual_sq += (target[:, start:stop] - columns.T).square().sum()
    norm_sq = target.square().sum().clamp_min(torch.finfo(torch.float64).tiny)
    return math.sqrt((residual_sq / norm_sq).item())


def _svd_error(target: Tensor, rank: int) -> float:
    """Relative error of truncated SVD at ``rank``: the singular values past ``rank``, from the
    eigenvalues of the smaller Gram matrix (much faster than an SVD of a large weight)."""
    out_features, in_features = target.shape
    gram = target @ target.T if out_features <= in_features else target.T @ target
    squared_values = torch.linalg.eigvalsh(gram).clamp_min(0)  # ascending
    tail = squared_values[: max(len(squared_values) - rank, 0)].sum()
    norm_sq = squared_values.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return math.sqrt((tail / norm_sq).item())


# The module's hook registries that stay meaningful for a layer of the same inputs and outputs
# (not the state_dict hooks: the parameters are new).
HOOK_REGISTRIES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
)


# Forward pre-hooks that rebuild the old weight from its own parameters (weight_orig, weight_g,
# weight_mask): the fit already took the weight they made, and the new layer has none to rebuild.
REPARAMETRIZATIONS = (BasePruningMethod, WeightNorm, SpectralNorm)


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """The new layer takes over the old one's forward and backward hooks: the registries
    themselves, so the handles that added them still remove them; but without the
    reparametrizations' hooks, in a registry of its own where the old one has any."""
    for registry in HOOK_REGISTRIES:
        hooks = getattr(old, registry)
        if registry == "_forward_pre_hooks" and any(
            isinstance(hook, REPARAMETRIZATIONS) for hook in hooks.values()
        ):
            hooks = OrderedDict(
                (key, hook)
                for key, hook in hooks.items()
                if not isinstance(hook, REPARAMETRIZATIONS)
            )
        setattr(new, registry, hooks)


def _install(model: nn.Module, names: Sequence[str], new_layer: nn.Module) -> None:
    """Put ``new_layer`` under every name of the old one (a shared layer stays shared)."""
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)  # "" is the model itself
        setattr(parent, child_name, new_layer)  # Sequential and ModuleList children too: "0"


def _count_params(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())  # shared ones once


def _table_row(layer: LayerReport) -> Tuple[str, ...]:
    def error(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.4f}"

    blocks = "-"
    if layer.num_blocks is not None:
        k_out, k_in = layer.num_blocks
        blocks = str(k_out) if k_out == k_in else f"{k_out}x{k_in}"
    return (
        layer.name,
        layer.kind,
        f"{layer.in_features}->{layer.out_features}",
        f"{layer.params_before:,}",
        f"{layer.params_after:,}",
        _percent(layer.params_after, layer.params_before),
        blocks,
        "-" if layer.rank is None else str(layer.rank),
        error(layer.nanomoe_error),
        "-" if layer.svd_rank is None else str(layer.svd_rank),
        error(layer.svd_error),
        "" if layer.skipped is None else f"skipped: {layer.skipped}",
    )


def _percent(part: int, whole: int) -> str:
    return "-" if whole == 0 else f"{100 * part / whole:.1f}%"
