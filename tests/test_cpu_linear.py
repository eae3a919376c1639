"""The blocks' Linear: nn.Linear's results and gradients, by oneDNN on the CPU where it can."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dharma_kernel import cpu_linear
from dharma_kernel.cpu_linear import Linear, bucket, onednn_linear_available, sgemm_only

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch has no oneDNN matmul")


def reference(layer: Linear, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """F.linear's output and gradients for x, weight and bias."""
    x = x.detach().clone().requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    out = F.linear(x, weight, bias)
    out.backward(grad)
    return out, x.grad, weight.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("shape", [(1, 24), (9, 24), (33, 24), (300, 24), (2, 7, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_f_linear_with_gradients(shape, bias, monkeypatch):
    onednn_linear_available()  # probe before counting
    calls = []
    original = cpu_linear._matmul
    monkeypatch.setattr(cpu_linear, "_matmul", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    layer = Linear(24, cpu_linear.SMALLEST_WEIGHT // 24 + 1, bias=bias)  # large enough for oneDNN
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = reference(layer, x, grad)
    assert out.shape == (*shape[:-1], layer.out_features)
    assert len(calls) == (3 if onednn_linear_available() else 0)
    got = (out, x.grad, layer.weight.grad, layer.bias.grad if bias else None)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, expected, strict=True):
        if b is not None:
            scale = b.abs().max().item()  # sums over thousands of terms: float32 rounding grows with them
            message = lambda m, name=name: f"{name}: {m}"  # noqa: E731
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale, msg=message)


@needs_onednn
def test_runs_onednn_on_the_cpu_and_sgemm_when_asked(monkeypatch):
    onednn_linear_available()  # probe before counting
    calls = []
    original = cpu_linear._matmul
    monkeypatch.setattr(cpu_linear, "_matmul", lambda *a: calls.append(a[0].shape) or original(*a))
    layer = Linear(512, 256)
    x = torch.randn(5, 512, requires_grad=True)
    layer(x).sum().backward()
    assert calls == [(8, 512), (8, 256), (256, 8)]  # forward, input and weight gradients; 5 rows padded to 8
    calls.clear()
    with sgemm_only():
        layer(x).sum().backward()
    assert calls == []
    Linear(16, 8)(x[:, :16]).sum().backward()  # a weight this small: sgemm is as fast
    assert calls == []


def test_falls_back_for_other_dtypes_autocast_and_torch_func(monkeypatch):
    onednn_linear_available()
    monkeypatch.setattr(cpu_linear, "_matmul", lambda *a: pytest.fail("oneDNN ran"))
    layer = Linear(512, 256).double()  # large enough for oneDNN in float32
    x = torch.randn(3, 512, dtype=torch.float64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer = Linear(512, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, 512)).dtype == torch.bfloat16
    x = torch.randn(3, 512)
    grad = torch.func.grad(lambda x: layer(x).sum())(x)
    torch.testing.assert_close(grad, layer.weight.sum(0).expand(3, -1))


@needs_onednn
@pytest.mark.parametrize("rows", [5, 8])  # padded, and not
def test_outputs_can_be_changed_in_place(rows):
    layer = Linear(512, 256)
    x = torch.randn(rows, 512, requires_grad=True)
    out = layer(x)
    out.add_(1.0)
    torch.relu_(out)
    out.sum().backward()
    expected = F.linear(x, layer.weight, layer.bias) + 1.0
    torch.testing.assert_close(out, torch.relu(expected))
    mask = (expected > 0).float()
    torch.testing.assert_close(x.grad, mask @ layer.weight, rtol=1e-5, atol=1e-4)


def test_is_an_nn_linear_with_its_state_dict():
    layer = Linear(6, 3)
    assert isinstance(layer, nn.Linear)
    plain = nn.Linear(6, 3)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 6)
    torch.testing.assert_close(plain(x), layer(x))


def test_availability_check_leaves_the_global_generator_alone():
    onednn_linear_available.cache_clear()
    torch.manual_seed(3)
    onednn_linear_available()
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))


def test_buckets_are_few_and_waste_little():
    sizes = {bucket(rows) for rows in range(1, 1025)}
    assert len(sizes) <= 30
    for rows in range(1, 1025):
        assert (
            rows <= bucket(rows) <= max(2 * rows - 1, 1) if rows <= 8 else rows <= bucket(rows) < 1.5 * rows
        )
    assert [bucket(n) for n in (1, 3, 8, 9, 13, 33, 65, 300)] == [1, 4, 8, 12, 16, 48, 80, 320]


def test_onednn_can_be_switched_off_from_the_environment(monkeypatch):
    monkeypatch.setenv("DHARMA_ONEDNN", "0")
    onednn_linear_available.cache_clear()
    try:
        assert not onednn_linear_available()
    finally:
        monkeypatch.delenv("DHARMA_ONEDNN")
        onednn_linear_available.cache_clear()


def test_a_routed_model_with_large_modules_trains_as_with_sgemm(monkeypatch):
    """Modules large enough for oneDNN: the loss and every gradient as with nn.Linear's sgemm."""
    from tiny import tiny_layout

    from dharma_kernel.assemble import build_model
    from dharma_kernel.testing import perturb, tiny_backbone_config

    layout = tiny_layout("routed", top_k=1)
    layout["modules"][0]["config"]["bottleneck"] = 4200  # 32 x 4200 weights: over SMALLEST_WEIGHT
    layout["modules"][1]["config"]["feed_forward"] = 4200
    model = build_model(tiny_backbone_config(), layout, seed=0)
    perturb(model.stacks, seed=1, std=0.05)
    model.train()
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(0))

    def run() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout both times
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    original = cpu_linear._matmul
    monkeypatch.setattr(cpu_linear, "_matmul", lambda *a: calls.append(1) or original(*a))
    loss, grads = run()
    assert len(calls) > 0 or not onednn_linear_available()
    with sgemm_only():
        expected_loss, expected = run()
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_a_pytorch_without_the_onednn_op_uses_sgemm(monkeypatch):
    def missing(*args):
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_linear_pointwise'")

    monkeypatch.setattr(cpu_linear, "_matmul", missing)
    onednn_linear_available.cache_clear()
    try:
        assert not onednn_linear_available()
        layer = Linear(512, 256)
        x = torch.randn(4, 512, requires_grad=True)
        layer(x).sum().backward()  # F.linear: no error
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    finally:
        onednn_linear_available.cache_clear()
