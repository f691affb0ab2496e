"""Saving and loading: state_dict round trips, and checkpoints of another layer refused with a
message naming the parameter, both shapes and both layers' configurations."""

import io
import re

import pytest
import torch
from torch import nn

import nanomoe
from nanomoe.budget import MIXINGS


def layer(rank: int = 4, blocks=4, mixing: str = "scalar", bias: bool = True, **kw):
    return nanomoe.NanoMoELinear(16, 24, rank, blocks, mixing, bias, **kw)


def through_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_round_trip_restores_the_layer(mixing: str, bias: bool, dtype: torch.dtype) -> None:
    saved = layer(3, (2, 4), mixing, bias, dtype=dtype)
    loaded = layer(3, (2, 4), mixing, bias, dtype=dtype)  # other random initial values
    loaded.load_state_dict(through_file(saved.state_dict()))
    assert saved.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = torch.randn(5, 16, dtype=dtype)
    assert torch.equal(saved(x), loaded(x))


def test_round_trip_inside_a_model() -> None:
    def model() -> nn.Module:
        return nn.Sequential(
            layer(4, 2, "diagonal_outer"), nn.GELU(), nanomoe.LowRankLinear(24, 8, 3)
        )

    saved, loaded = model(), model()
    loaded.load_state_dict(through_file(saved.state_dict()))
    x = torch.randn(7, 16)
    assert torch.equal(saved(x), loaded(x))


def shape(t: torch.Tensor) -> str:
    return re.escape(str(t.shape))


# The checkpoint's layer and the layer it is loaded into (as layer()'s arguments), and a parameter
# whose shapes differ.
MISMATCHES = {
    "other rank": ({"rank": 4}, {"rank": 2}, "down"),
    "other blocks": ({"blocks": 4}, {"blocks": 2}, "down"),
    "other block pair": ({"blocks": (4, 2)}, {"blocks": (2, 4)}, "up"),
    "scalar into diagonal": ({"mixing": "scalar"}, {"mixing": "diagonal"}, "mix"),
    "diagonal_outer into scalar": ({"mixing": "diagonal_outer"}, {"mixing": "scalar"}, "mix"),
    "full into diagonal": ({"mixing": "full"}, {"mixing": "diagonal"}, "mix"),
    "diagonal into full": ({"mixing": "diagonal"}, {"mixing": "full"}, "mix"),
}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("case", MISMATCHES)
def test_other_layer_is_refused_naming_parameter_shapes_and_layers(case: str, strict: bool) -> None:
    saved_args, target_args, name = MISMATCHES[case]
    saved, target = layer(**saved_args), layer(**target_args)
    checkpoint = {f"0.{k}": v for k, v in saved.state_dict().items()}
    with pytest.raises(RuntimeError) as error:
        nn.Sequential(target).load_state_dict(checkpoint, strict=strict)
    message = str(error.value)
    mismatch = f"size mismatch for 0.{name}: .* shape {shape(getattr(saved, name))} from checkpoint"
    assert re.search(mismatch, message), message
    assert re.search(f"current model is {shape(getattr(target, name))}", message), message
    # And which layers they are: the checkpoint's, read off its shapes, and this one.
    assert f"the checkpoint holds a NanoMoELinear({saved.extra_repr()})" in message, message
    assert f"but this layer '0' is NanoMoELinear({target.extra_repr()})" in message, message


@pytest.mark.parametrize(
    ("saved", "target", "keys"),
    [
        ("diagonal_outer", "diagonal", 'Unexpected key(s) in state_dict: "mix_left", "mix_right"'),
        ("diagonal", "diagonal_outer", 'Missing key(s) in state_dict: "mix_left", "mix_right"'),
    ],
)
def test_gate_tensors_of_another_variant_are_named(saved: str, target: str, keys: str) -> None:
    # diagonal and diagonal_outer share mix's shape: only the outer product's tensors tell them
    # apart, and strict loading names them (non-strict loading skips them, as torch does).
    with pytest.raises(RuntimeError, match=re.escape(keys)):
        layer(mixing=target).load_state_dict(layer(mixing=saved).state_dict())


def test_matching_checkpoint_adds_no_message() -> None:
    result = layer(mixing="full").load_state_dict(layer(mixing="full").state_dict())
    assert not result.missing_keys and not result.unexpected_keys
