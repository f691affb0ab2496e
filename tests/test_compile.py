"""The layer under torch.compile (no graph breaks), torch.export, and TorchScript."""

import io

import pytest
import torch
from torch import nn

import nanomoe
from nanomoe.budget import MIXINGS


def model(mixing: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nanomoe.NanoMoELinear(16, 24, 3, (3, 2), mixing),
        nn.GELU(),
        nanomoe.NanoMoELinear(24, 8, 2, 4, mixing, bias=False),
    )


def forward_backward(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad()
    out = net(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("mixing", MIXINGS)
def test_compile_fullgraph_forward_backward(mixing: str) -> None:
    net = model(mixing)
    x = torch.randn(5, 7, 16)
    expected_out, expected_grads = forward_backward(net, x)
    # aot_eager runs the same AOTAutograd tracing as inductor (fake kernels, joint graph).
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out, grads = forward_backward(compiled, x)
    torch.testing.assert_close(out, expected_out)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected)


def test_compile_inductor_dynamic_batch() -> None:
    net = model("diagonal_outer")
    compiled = torch.compile(net, fullgraph=True, dynamic=True)
    for tokens in (3, 11):
        x = torch.randn(tokens, 16)
        expected_out, expected_grads = forward_backward(net, x)
        out, grads = forward_backward(compiled, x)
        torch.testing.assert_close(out, expected_out)
        for grad, expected in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_torch_export_keeps_the_operator(mixing: str) -> None:
    net = model(mixing).eval()
    x = torch.randn(6, 16)
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
    assert "nanomoe.linear" in str(exported.graph)
    for tokens in (2, 9):
        x = torch.randn(tokens, 16)
        torch.testing.assert_close(exported.module()(x), net(x))


@pytest.mark.parametrize("mixing", MIXINGS)
def test_torchscript_save_load_with_gradients(mixing: str) -> None:
    net = model(mixing)
    scripted = torch.jit.script(net)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(4, 16)
    expected_out, expected_grads = forward_backward(net, x)
    out, grads = forward_backward(loaded, x)
    torch.testing.assert_close(out, expected_out)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected)
