"""replace_linear: selection, budgets, what is kept, fit quality, skips, and Hugging Face models."""

import copy
import re
import warnings

import pytest
import torch
from tiny_models import bert_config, gpt2_config
from torch import nn

import nanomoe
import nanomoe.replace
from nanomoe.budget import MIXINGS, dense_params, lowrank_rank_for_budget, nanomoe_params
from nanomoe.reference import dense_weight_reference


class Net(nn.Module):
    """Names ``encoder.0``, ``encoder.2`` and ``head``: nested, indexed and plain."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32, bias=bias))
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        return self.head(self.encoder(x))


def net(seed: int = 0, bias: bool = True) -> Net:
    torch.manual_seed(seed)
    return Net(bias)


def replace(model: nn.Module, **options) -> nanomoe.CompressionReport:
    return nanomoe.replace_linear(model, **{"budget": 0.5, "progress": False, **options})


def dense_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def nanomoe_layers(model: nn.Module) -> list[str]:
    return [
        name for name, module in model.named_modules() if isinstance(module, nanomoe.NanoMoELinear)
    ]


def structured_weight(in_features, out_features, rank, num_blocks, mixing, seed=0):
    """A dense weight that is exactly a NanoMoE weight (up to float32 rounding)."""
    torch.manual_seed(seed)
    layer = nanomoe.NanoMoELinear(in_features, out_features, rank, num_blocks, mixing)
    factors = (layer.down, layer.mix, layer.up, layer.mix_left, layer.mix_right)
    return dense_weight_reference(*(None if t is None else t.double() for t in factors)).float()


def exact_budget(in_features, out_features, rank, num_blocks, mixing, bias=True) -> float:
    """The fraction whose largest in-budget rank is exactly ``rank``."""
    params = nanomoe_params(in_features, out_features, rank, num_blocks, mixing, bias)
    return (params + 0.5) / dense_params(in_features, out_features, bias)


def svd_error(singular_values, rank: int) -> float:
    """Relative error of truncated SVD at ``rank``."""
    return (singular_values[rank:].norm() / singular_values.norm()).item()


def relative_error(actual, expected) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def test_include_and_exclude_select_by_regular_expression():
    model = net()
    report = replace(model, include=r"^encoder\.", exclude=r"\.2$")
    assert [layer.name for layer in report.layers] == ["encoder.0"]
    assert nanomoe_layers(model) == ["encoder.0"]
    assert dense_layers(model) == ["encoder.2", "head"]


def test_default_selection_is_every_dense_layer():
    model = net()
    report = replace(model)
    assert [layer.name for layer in report.layers] == ["encoder.0", "encoder.2", "head"]
    assert all(layer.replaced for layer in report.layers)
    assert dense_layers(model) == []
    assert model(torch.randn(5, 32)).shape == (5, 16)


def test_a_selection_of_nothing_raises_and_lists_the_candidates():
    model = net()
    with pytest.raises(ValueError, match=r"select none.*encoder\.0, encoder\.2, head"):
        replace(model, include="decoder")
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        replace(nn.Sequential(nn.ReLU()))
    assert dense_layers(model) == ["encoder.0", "encoder.2", "head"]


@pytest.mark.parametrize(
    "options",
    [
        {"budget": 0.0},
        {"budget": 1.5},
        {"budget": True},
        {"budget": "half"},
        {"mixing": "gated"},
        {"num_blocks": "many"},
        {"num_blocks": 0},
        {"init": "svd"},
        {"iters": -1},
        {"budget_metric": "flops"},
        {"include": "("},
        {"exclude": 3},
    ],
)
def test_bad_options_raise_before_anything_changes(options):
    model = net()
    with pytest.raises(ValueError):
        replace(model, **options)
    assert dense_layers(model) == ["encoder.0", "encoder.2", "head"]


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("num_blocks", ["auto", 2, (4, 2)])
@pytest.mark.parametrize("budget", [0.25, 0.6])
def test_every_layer_stays_within_its_budget(mixing, num_blocks, budget):
    model = net(bias=False)
    before = sum(p.numel() for p in model.parameters())
    report = replace(model, budget=budget, mixing=mixing, num_blocks=num_blocks, init="random")
    assert all(layer.replaced for layer in report.layers)
    for layer in report.layers:
        module = model.get_submodule(layer.name)
        assert layer.params_after == sum(p.numel() for p in module.parameters())
        assert layer.params_after <= budget * layer.params_before
        assert layer.rank == module.rank and layer.num_blocks == module.num_blocks
        if num_blocks != "auto":
            assert module.num_blocks == nanomoe.budget.block_pair(num_blocks)
    assert report.model_params_before == before
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    assert report.params_after == report.model_params_after  # every layer replaced


def test_the_macs_budget_bounds_multiply_adds():
    model = net()
    report = replace(model, budget=0.3, budget_metric="macs", num_blocks=4)
    for layer in report.layers:
        macs = nanomoe.budget.nanomoe_macs(
            layer.in_features, layer.out_features, layer.rank, layer.num_blocks
        )
        assert macs <= 0.3 * layer.in_features * layer.out_features


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init", ["fit", "random"])
def test_bias_dtype_device_mode_and_requires_grad_are_kept(device, dtype, init):
    model = net().to(device, dtype).eval()
    model.head.requires_grad_(False)
    original = copy.deepcopy(model)
    replace(model, init=init)
    for name in ("encoder.0", "encoder.2", "head"):
        old, new = original.get_submodule(name), model.get_submodule(name)
        assert isinstance(new, nanomoe.NanoMoELinear)
        assert torch.equal(new.bias, old.bias)
        assert {p.dtype for p in new.parameters()} == {dtype}
        assert {p.device.type for p in new.parameters()} == {device}
        assert not new.training
        assert {p.requires_grad for p in new.parameters()} == {name != "head"}
    assert model(torch.randn(3, 32, device=device, dtype=dtype)).dtype == dtype


def test_a_layer_without_bias_gets_none():
    model = net(bias=False)
    replace(model)
    assert model.encoder[2].bias is None


@pytest.mark.parametrize("mixing", ["scalar", "full"])
def test_fit_recovers_nanomoe_structured_weights(mixing):
    model = net()
    budgets = {}
    for name in ("encoder.0", "encoder.2", "head"):
        layer = model.get_submodule(name)
        shape = (layer.in_features, layer.out_features)
        layer.weight.data = structured_weight(*shape, 3, 4, mixing)
        budgets[name] = exact_budget(*shape, 3, 4, mixing)
    original = copy.deepcopy(model)
    for name, budget in budgets.items():  # one call per layer, each at its own exact budget
        report = replace(
            model, include=f"^{re.escape(name)}$", budget=budget, num_blocks=4, mixing=mixing
        )
        (layer,) = report.layers
        assert layer.rank == 3
        assert layer.nanomoe_error < 1e-5 < layer.svd_error
    x = torch.randn(7, 32)
    assert relative_error(model(x), original(x)) < 1e-5


@pytest.mark.parametrize("mixing", MIXINGS)
def test_fit_is_never_worse_than_svd_at_its_own_rank(mixing):
    model = net()
    original = copy.deepcopy(model)
    report = replace(model, budget=0.4, mixing=mixing, iters=5)
    for layer in report.layers:
        weight = original.get_submodule(layer.name).weight.double()
        values = torch.linalg.svdvals(weight)
        assert layer.nanomoe_error <= svd_error(values, layer.rank) + 1e-6
        # The report's baseline: SVD at the low-rank rank of the same budget, not at NanoMoE's.
        limit = int(0.4 * layer.params_before)
        assert layer.svd_rank == lowrank_rank_for_budget(
            layer.in_features, layer.out_features, limit
        )
        assert layer.svd_rank >= layer.rank
        assert layer.svd_error == pytest.approx(svd_error(values, layer.svd_rank), abs=1e-9)
        new = model.get_submodule(layer.name)
        dense = new.to_dense().double()
        assert layer.nanomoe_error == pytest.approx(relative_error(dense, weight), abs=1e-5)


def test_random_init_reports_the_error_of_its_random_weight():
    model = net()
    original = copy.deepcopy(model)
    report = replace(model, init="random", num_blocks=2)
    fitted = replace(copy.deepcopy(original), init="fit", num_blocks=2)
    for layer, fit_layer in zip(report.layers, fitted.layers):
        weight = original.get_submodule(layer.name).weight
        dense = model.get_submodule(layer.name).to_dense()
        assert layer.nanomoe_error == pytest.approx(relative_error(dense, weight), abs=1e-5)
        assert fit_layer.nanomoe_error < 1 < layer.nanomoe_error  # random factors: unrelated


def test_layers_that_fit_no_configuration_are_skipped_with_the_reason():
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 32))
    report = replace(model, num_blocks=4)  # 4 does not divide 30
    first, second = report.layers
    assert "do not divide in_features=30" in first.skipped
    assert first.params_after == first.params_before and first.rank is None
    assert isinstance(model[0], nn.Linear) and second.replaced
    assert report.params_before == second.params_before  # totals count replaced layers only
    with pytest.warns(UserWarning, match="replaced no layer"):
        report = replace(model, budget=0.01, include="^0$")
    assert "fits a budget" in report.layers[0].skipped
    assert "skipped: " in str(report)


def test_a_shared_layer_is_replaced_everywhere_and_a_tied_one_is_skipped():
    shared = nn.Linear(16, 16)
    embedding = nn.Embedding(16, 16)
    output = nn.Linear(16, 16, bias=False)
    output.weight = embedding.weight
    model = nn.ModuleDict(
        {"a": shared, "b": nn.Sequential(shared), "emb": embedding, "out": output}
    )
    report = replace(model)
    by_name = {layer.name: layer for layer in report.layers}
    assert sorted(by_name) == ["a", "out"]
    assert by_name["out"].skipped == "weight tied to emb"
    assert isinstance(model["a"], nanomoe.NanoMoELinear) and model["b"][0] is model["a"]
    assert model["out"].weight is model["emb"].weight


def test_multihead_attention_and_the_root_are_left_alone():
    model = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 16))
    report = replace(model)
    assert "MultiheadAttention" in report.layers[0].skipped
    assert report.layers[1].replaced
    x = torch.randn(2, 5, 16)
    model[0](x, x, x)
    with pytest.warns(UserWarning, match="replaced no layer"):
        report = replace(nn.Linear(16, 16))
    assert "the model itself" in report.layers[0].skipped


def test_an_unsupported_dtype_is_skipped():
    with pytest.warns(UserWarning, match="replaced no layer"):
        report = replace(net().half())
    assert all("float16 on cpu" in layer.skipped for layer in report.layers)


def test_a_layer_with_non_finite_weights_is_skipped():
    model = net()
    model.head.weight.data[0, 0] = float("nan")
    report = replace(model, init="random")
    assert report.layers[2].skipped == "weight has non-finite entries"
    assert [layer.replaced for layer in report.layers] == [True, True, False]


def test_the_error_is_the_same_measured_in_column_chunks(monkeypatch):
    whole = replace(net(), mixing="diagonal_outer", iters=2)
    monkeypatch.setattr(nanomoe.replace, "COLUMN_CHUNK", 5)  # 32 and 64 inputs: ragged chunks
    chunked = replace(net(), mixing="diagonal_outer", iters=2)
    for layer, chunked_layer in zip(whole.layers, chunked.layers):
        assert chunked_layer.nanomoe_error == pytest.approx(layer.nanomoe_error, rel=1e-12)


def test_a_failure_midway_leaves_the_model_as_it_was(monkeypatch):
    real_fit = nanomoe.replace.fit_dense
    calls = []

    def failing_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second layer: the first is built, not yet installed
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(nanomoe.replace, "fit_dense", failing_fit)
    model = net()
    with pytest.raises(KeyboardInterrupt):
        replace(model)
    assert dense_layers(model) == ["encoder.0", "encoder.2", "head"]


def test_the_report_prints_an_aligned_table():
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 32))
    report = replace(model, num_blocks=4)
    header, skipped, replaced, summary = str(report).splitlines()
    assert header.split()[:4] == ["layer", "kind", "in->out", "params"]
    assert skipped.startswith("0 ") and "skipped: K_in=4 blocks do not divide" in skipped
    assert replaced.startswith("2 ") and "skipped" not in replaced
    end = header.index("params") + len("params")  # numbers right-aligned under their header
    for row, layer in zip((skipped, replaced), report.layers):
        assert row[:end].endswith(f" {layer.params_before:,}")
    assert summary.startswith("NanoMoE scalar, init fit, budget 0.5 of each layer's params")
    assert "replaced 1 of 2 selected layers" in summary


def test_progress_bar_writes_to_stderr(capsys):
    nanomoe.replace_linear(net(), budget=0.5, progress=True)
    assert "replace_linear" in capsys.readouterr().err


# Hugging Face models, built from tiny configs with random weights: nothing is downloaded.


def test_bert_mlp_layers(transformers):
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config(transformers)).eval()
    original = copy.deepcopy(model)
    mlp = r"layer\.\d+\.(intermediate|output)\.dense$"
    report = replace(model, include=mlp, budget=0.5)
    assert [layer.name for layer in report.layers] == [
        f"encoder.layer.{i}.{part}.dense" for i in (0, 1) for part in ("intermediate", "output")
    ]
    assert nanomoe_layers(model) == [layer.name for layer in report.layers]
    assert "encoder.layer.0.attention.output.dense" in dense_layers(model)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        out, expected = model(ids).last_hidden_state, original(ids).last_hidden_state
    assert out.shape == (2, 8, 32) and torch.isfinite(out).all()
    assert relative_error(out, expected) < 1


def test_gpt2_conv1d_is_replaced_by_the_same_function(transformers):
    torch.manual_seed(0)
    model = transformers.GPT2Model(gpt2_config(transformers)).eval()
    for block in model.h:  # Conv1D's weight is (in, out): transpose a structured (out, in) one
        block.mlp.c_fc.weight.data = structured_weight(32, 128, 4, 4, "scalar").T.contiguous()
    original = copy.deepcopy(model)
    budget = exact_budget(32, 128, 4, 4, "scalar")
    report = replace(model, include=r"mlp\.c_fc", budget=budget, num_blocks=4)
    assert [(layer.kind, layer.rank) for layer in report.layers] == [("Conv1D", 4)] * 2
    assert nanomoe_layers(model) == ["h.0.mlp.c_fc", "h.1.mlp.c_fc"]
    x = torch.randn(3, 32)
    with torch.no_grad():
        new, old = model.h[0].mlp.c_fc, original.h[0].mlp.c_fc
        assert torch.equal(new.bias, old.bias)
        assert relative_error(new(x), old(x)) < 1e-5
        ids = torch.randint(0, 64, (2, 8))
        out = model(ids).last_hidden_state
        assert relative_error(out, original(ids).last_hidden_state) < 1e-5


def test_gpt2_fit_beats_random_and_the_tied_head_is_kept(transformers):
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(gpt2_config(transformers)).eval()
    ids = torch.randint(0, 64, (2, 8))
    errors = {}
    for init in ("fit", "random"):
        model = copy.deepcopy(original)
        report = replace(model, budget=0.5, init=init)
        skipped = {layer.name: layer.skipped for layer in report.skipped}
        assert skipped == {"lm_head": "weight tied to transformer.wte"}
        assert len(nanomoe_layers(model)) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
        with torch.no_grad():
            logits = model(ids).logits
            assert logits.shape == (2, 8, 64)
            errors[init] = relative_error(logits, original(ids).logits)
    assert errors["fit"] < errors["random"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: layers were replaced
        replace(copy.deepcopy(original), include=r"mlp")


def test_hooks_carry_over_to_the_new_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    seen: list = []
    before = model[0].register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m))))
    model[0].register_forward_hook(lambda m, args, out: seen.append(("post", out.shape)))
    grads: list = []
    model[0].register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0].shape))
    nanomoe.replace_linear(model, budget=0.5, num_blocks=2, include=r"^0$", progress=False)
    assert isinstance(model[0], nanomoe.NanoMoELinear)
    model(torch.randn(3, 32, requires_grad=True)).sum().backward()
    assert seen == [("pre", nanomoe.NanoMoELinear), ("post", (3, 32))]
    assert grads == [(3, 32)]
    before.remove()  # the handle still reaches the hook on the new layer
    model(torch.randn(3, 32))
    assert seen[2:] == [("post", (3, 32))]


@pytest.mark.parametrize(
    "reparametrize",
    [
        lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.5),
        lambda m: torch.nn.utils.weight_norm(m),
        lambda m: torch.nn.utils.spectral_norm(m),
    ],
    ids=["prune", "weight_norm", "spectral_norm"],
)
def test_weight_reparametrizations_are_not_carried_over(reparametrize) -> None:
    # Their pre-hooks rebuild the old weight from weight_orig, weight_g, weight_mask: the fit
    # takes the weight they made, and the new layer must not run them.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    reparametrize(model[0])
    seen: list = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(type(m)))
    x = torch.randn(3, 32)
    with torch.no_grad():
        dense = model[0].weight.clone()
    report = nanomoe.replace_linear(model, budget=0.5, num_blocks=2, progress=False)
    layer = model[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ layer.to_dense().T + layer.bias)
        error = ((layer.to_dense() - dense).norm() / dense.norm()).item()
    assert error == pytest.approx(report.replaced[0].nanomoe_error, rel=1e-4)  # fitted to it
    assert seen[-1] is nanomoe.NanoMoELinear  # other hooks still carried
