"""Mixed precision: which dtype to compute in, and the loss scale fp16 needs.

``auto`` is bf16 autocast on a GPU that supports it, fp16 with loss scaling on an
older GPU, and fp32 on CPU: on the 2-core CPU this project is developed on, bf16
autocast trained about 2.5x slower than fp32. Parameters always stay fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import DharmaError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` made concrete for ``device``; an explicit choice the device cannot do is an error."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return "bf16" if bf16 else "fp16"
        if precision == "bf16" and not bf16:
            raise DharmaError(
                f"train.precision: {torch.cuda.get_device_name(device)} has no bf16 support",
                hint='Use precision = "fp16" (loss-scaled) or "auto".',
            )
        return precision
    return "fp32" if precision == "auto" else precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


@dataclass
class LossScale:
    """Dynamic loss scaling for fp16: halve on overflow, double after ``interval`` clean steps.

    Kept here rather than torch's GradScaler because it must drive any optimizer the
    trainer builds (including per-parameter ones); its whole state is two numbers.
    """

    scale: float = 2.0**16
    clean_steps: int = 0
    interval: int = 2000
    enabled: bool = True

    def unscale(self, params: Iterable[torch.nn.Parameter]) -> None:
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.scale / 2, 1.0)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.interval:
            self.scale *= 2
            self.clean_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
