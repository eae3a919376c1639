"""Everything besides the weights that exact resume needs, saved beside them.

``trainer_state.pt`` holds only tensors, numbers, strings and containers of them,
so it loads with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from ..errors import DharmaError, first_line
from .rundir import STATE_FILE

FORMAT = 1


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def save_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save({"format": FORMAT, **state}, directory / STATE_FILE)


def load_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DharmaError(
            f"{directory} has no {STATE_FILE}: it is a model, not a resumable checkpoint"
        ) from None
    except Exception as err:  # a truncated or foreign file
        raise DharmaError(f"{path}: unreadable training state ({first_line(err)})") from None
    if state.get("format") != FORMAT:
        raise DharmaError(f"{path}: training state format {state.get('format')!r}, expected {FORMAT}")
    return state
