"""``nanomoe compress``: Hugging Face directories and torch.save'd modules, saved and reloaded."""

import json

import pytest
import torch
from tiny_models import bert_config, gpt2_config
from torch import nn

import nanomoe
import nanomoe.cli
from nanomoe.compress import MODELING, compress, load, main, save


def gpt2_dir(transformers, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(gpt2_config(transformers)).save_pretrained(path)
    return path


def nanomoe_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nanomoe.NanoMoELinear)]


def test_gpt2_round_trip(transformers, tmp_path, capsys):
    source = gpt2_dir(transformers, tmp_path)
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    argv = [str(source), "--out", str(out), "--budget", "0.5", "--include", "mlp"]
    main([*argv, "--report", str(report_path), "--iters", "2"])
    printed = capsys.readouterr()
    assert "h.0.mlp.c_fc" in printed.out and "h.1.mlp.c_proj" in printed.out
    assert "replaced 4 of 4 selected layers" in printed.out
    assert "loading" in printed.err and "replace_linear" in printed.err  # steps and the bar

    report = json.loads(report_path.read_text())
    names = [layer["name"] for layer in report["layers"]]
    assert names == [f"transformer.h.{i}.mlp.{p}" for i in (0, 1) for p in ("c_fc", "c_proj")]
    assert all(layer["replaced"] and layer["kind"] == "Conv1D" for layer in report["layers"])
    assert report["params_after"] < report["params_before"]
    assert report["budget"] == 0.5 and report["mixing"] == "scalar"

    # The same compression in memory (the fit is deterministic) against the saved one reloaded.
    compressed, _ = compress(
        source, tmp_path / "again", budget=0.5, include="mlp", iters=2, progress=False
    )
    reloaded = load(out)
    assert type(reloaded).__name__ == "NanoMoEGPT2LMHeadModel" and not reloaded.training
    assert isinstance(reloaded, transformers.GPT2LMHeadModel)
    assert nanomoe_layers(reloaded) == names
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight  # still tied
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, compressed.eval()(ids).logits)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["nanomoe"]["architecture"] == "GPT2LMHeadModel"
    assert [layer["num_blocks"] for layer in config["nanomoe"]["layers"]] == [
        list(layer["num_blocks"]) for layer in report["layers"]
    ]

    # transformers itself, through the modeling file the directory carries.
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanomoe.NanoMoEGPT2LMHeadModel"
    assert (out / MODELING).is_file()
    hub = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert nanomoe_layers(hub) == names
    assert hub.lm_head.weight is hub.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(hub(ids).logits, reloaded(ids).logits)
    # AutoModel gives the base model inside, with its NanoMoE layers, not a dense one.
    base = transformers.AutoModel.from_pretrained(out, trust_remote_code=True)
    assert isinstance(base, transformers.GPT2Model)
    assert nanomoe_layers(base) == [name.removeprefix("transformer.") for name in names]
    with torch.no_grad():
        torch.testing.assert_close(
            base(ids).last_hidden_state, reloaded.transformer(ids).last_hidden_state
        )
    # Saved again, by a model transformers or load built: both read it back, with its layers.
    for built, name in ((hub, "from-hub"), (reloaded, "from-load")):
        built.save_pretrained(tmp_path / name)
        assert (tmp_path / name / MODELING).is_file()
        for again in (
            transformers.AutoModelForCausalLM.from_pretrained(
                tmp_path / name, trust_remote_code=True
            ),
            load(tmp_path / name),
        ):
            assert nanomoe_layers(again) == names
            with torch.no_grad():
                assert torch.equal(again(ids).logits, reloaded(ids).logits)
    # The base model AutoModel built, saved by nanomoe: it is a GPT2Model with its layers.
    save(base, tmp_path / "base")
    again = transformers.AutoModel.from_pretrained(tmp_path / "base", trust_remote_code=True)
    assert type(again).__name__ == "NanoMoEGPT2Model"
    assert nanomoe_layers(again) == nanomoe_layers(base)
    assert nanomoe_layers(load(tmp_path / "base")) == nanomoe_layers(base)


def test_bert_fixed_blocks_through_the_nanomoe_command(transformers, tmp_path, capsys):
    torch.manual_seed(0)
    source, out = tmp_path / "bert", tmp_path / "out"
    transformers.BertModel(bert_config(transformers)).eval().save_pretrained(source)
    # A sentence-transformers layout around it: its module files and folders come along.
    (source / "modules.json").write_text("[]")
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text("{}")
    argv = [str(source), "--out", str(out), "--budget", "0.5", "--include", "intermediate"]
    nanomoe.cli.main(["compress", *argv, "--num-blocks", "2", "--init", "random", "--no-progress"])
    printed = capsys.readouterr()
    assert "encoder.layer.0.intermediate.dense" in printed.out
    assert "Loading weights" not in printed.err and "replace_linear" not in printed.err
    assert (out / "modules.json").read_text() == "[]"
    assert (out / "1_Pooling" / "config.json").read_text() == "{}"
    reloaded = load(out)
    layers = [reloaded.get_submodule(name) for name in nanomoe_layers(reloaded)]
    assert [layer.num_blocks for layer in layers] == [(2, 2), (2, 2)]
    hub = transformers.AutoModel.from_pretrained(out, trust_remote_code=True)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(hub.state_dict()[key], value), key


def test_save_after_replace_linear_in_memory(transformers, tmp_path):
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config(transformers)).eval()
    # Two calls, two mixings: save records every NanoMoE layer, not one report's.
    nanomoe.replace_linear(model, budget=0.5, include="output.dense", progress=False)
    nanomoe.replace_linear(
        model, budget=0.5, mixing="diagonal", include="intermediate", iters=2, progress=False
    )
    save(model, tmp_path / "out")
    # The model's own config keeps no auto_map naming a file only the directory has.
    assert not hasattr(model.config, "auto_map") and not hasattr(model.config, "nanomoe")
    hub = transformers.AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert nanomoe_layers(hub) == nanomoe_layers(model) and len(nanomoe_layers(hub)) == 6
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(hub(ids).last_hidden_state, model(ids).last_hidden_state)
    with pytest.raises(TypeError, match="transformers model"):
        save(nn.Sequential(nn.Linear(4, 4)), tmp_path / "bad")


def test_save_refuses_a_layer_under_two_names(transformers, tmp_path):
    model = transformers.BertModel(bert_config(transformers))
    nanomoe.replace_linear(model, budget=0.5, include=r"layer\.0\.output\.dense", progress=False)
    model.encoder.layer[1].output.dense = model.encoder.layer[0].output.dense
    with pytest.raises(ValueError, match="shared with"):
        save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_torch_save_round_trip(tmp_path, capsys):
    torch.manual_seed(0)
    source, out = tmp_path / "net.pt", tmp_path / "sub" / "net-nanomoe.pt"
    torch.save(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)), source)
    main([str(source), "--out", str(out), "--budget", "0.5", "--num-blocks", "2x4"])
    assert "replaced 2 of 2" in capsys.readouterr().out
    reloaded = torch.load(out, weights_only=False)
    assert isinstance(reloaded[0], nanomoe.NanoMoELinear) and reloaded[0].num_blocks == (2, 4)
    compressed, _ = compress(
        source, tmp_path / "again.pt", budget=0.5, num_blocks=(2, 4), progress=False
    )
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), compressed(x))
        assert torch.equal(load(out)(x), compressed(x))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("empty_dir", "without config.json"),
        ("state_dict", "not an nn.Module"),
        ("no_match", "select none"),
        (
            "config_only",
            "nanomoe compress: error: ",
        ),  # transformers fails to load it (or is absent)
    ],
)
def test_bad_inputs_exit_with_a_message(tmp_path, capsys, case, message):
    path = tmp_path / case
    if case == "empty_dir":
        path.mkdir()
    elif case == "state_dict":
        torch.save(nn.Linear(4, 4).state_dict(), path)
    elif case == "config_only":
        path.mkdir()
        (path / "config.json").write_text("{}")
    elif case == "no_match":
        torch.save(nn.Sequential(nn.Linear(8, 8)), path)
    argv = [str(path), "--out", str(tmp_path / "out"), "--budget", "0.5", "--include", "nothing"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    text = capsys.readouterr().err + str(exit_info.value.code)
    assert message in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["m", "--budget", "0.5"], ["m", "--out", "o", "--budget", "x"]])
def test_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "usage: nanomoe compress" in capsys.readouterr().err


def test_unknown_command(capsys):
    with pytest.raises(SystemExit):
        nanomoe.cli.main(["compres"])
    assert "compress" in capsys.readouterr().err
