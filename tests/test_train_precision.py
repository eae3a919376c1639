"""Precision choice per device and the fp16 loss scale."""

from __future__ import annotations

import torch

from dharma_kernel.train.precision import LossScale, autocast, resolve_precision


def test_auto_is_fp32_on_cpu_and_explicit_choices_stand():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"


def test_bf16_autocast_computes_matmuls_in_bf16():
    a = torch.randn(4, 4)
    with autocast("bf16", torch.device("cpu")):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert (a @ a).dtype == torch.float32


def test_loss_scale_halves_on_overflow_and_doubles_after_clean_steps():
    scale = LossScale(scale=1024.0, interval=3)
    scale.update(False)
    assert scale.scale == 512.0
    for _ in range(3):
        scale.update(True)
    assert scale.scale == 1024.0 and scale.clean_steps == 0
    again = LossScale()
    again.load_state_dict(scale.state_dict())
    assert (again.scale, again.clean_steps) == (1024.0, 0)


def test_unscale_divides_gradients_by_the_scale():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), 8.0)
    LossScale(scale=4.0).unscale([p])
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    LossScale(enabled=False).unscale([p])
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
