"""Export an assembled model to a portable graph: ``torch.export`` (.pt2) or ONNX.

The exported graph is inference only, without a KV cache:

    inputs   input_ids       int64 [batch, length]
             attention_mask  int64 [batch, length]   1 for real tokens, 0 for padding
    output   logits          float32 [batch, length, vocab]

``batch`` and ``length`` are dynamic (``length`` up to the backbone's position limit).
Routed stacks run in dense mode while exporting (every module at every token,
unchosen ones weighted zero): the same logits without the data-dependent gather and
scatter, which graph exporters cannot trace. Task heads are not exported.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbone import context_length
from .errors import DharmaError, first_line
from .protocol import DharmaModule, ModuleContext

FORMATS = ("onnx", "torch-export")
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2"}
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("logits",)


class LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits``: the model's forward as an exporter sees it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@contextlib.contextmanager
def dense_routing(model: nn.Module) -> Iterator[None]:
    """Run every routed stack of ``model`` densely inside the block."""
    stacks = [m for m in model.modules() if hasattr(m, "dense_routing")]
    before = [s.dense_routing for s in stacks]
    for stack in stacks:
        stack.dense_routing = True
    try:
        yield
    finally:
        for stack, value in zip(stacks, before, strict=True):
            stack.dense_routing = value


@contextlib.contextmanager
def _without_heads(model: nn.Module) -> Iterator[None]:
    """Task heads detached: they add nothing to the logits, and need not export."""
    heads = getattr(model, "heads", None)
    if heads is not None:
        model.heads = nn.ModuleDict()
    try:
        yield
    finally:
        if heads is not None:
            model.heads = heads


def example_inputs(model: nn.Module, batch: int = 2, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a left-padded mask to trace with (sizes over 1, so no dimension is specialised)."""
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    return ids, mask


def max_length(model: nn.Module) -> int:
    return context_length(model.config.text_config, default=4096)


def export_program(model: nn.Module) -> torch.export.ExportedProgram:
    """``torch.export`` of ``LogitsOnly(model)`` with dynamic batch and length.

    A module whose forward does not trace fails with a DharmaError naming it.
    """
    model = model.eval()
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=1, max=max_length(model))
    shapes = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    # torch.export prints the partial graph of a failed trace to stderr: thousands of lines
    chatter = io.StringIO()
    with _innermost_module(model) as running, dense_routing(model), _without_heads(model), torch.no_grad():
        try:
            with contextlib.redirect_stderr(chatter):
                return torch.export.export(LogitsOnly(model), example_inputs(model), dynamic_shapes=shapes)
        except Exception as err:
            raise _export_error(running, err) from None


def export_model(model: nn.Module, output: str | Path, fmt: str) -> Path:
    """Write ``model`` to ``output`` as ``fmt`` (``onnx`` or ``torch-export``); returns the file."""
    if fmt not in FORMATS:
        raise DharmaError(f"unknown export format {fmt!r}", hint=f"Use one of: {', '.join(FORMATS)}.")
    output = Path(output)
    if output.is_dir():
        raise DharmaError(
            f"{output} is a directory", hint=f"Give a file name, such as {output / 'model'}{SUFFIXES[fmt]}."
        )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DharmaError(f"cannot write {output}: {first_line(err)}") from None
    program = export_program(model)
    try:
        if fmt == "torch-export":
            torch.export.save(program, str(output))
        else:
            _write_onnx(program, output, LogitsOnly(model))
    except OSError as err:
        raise DharmaError(f"cannot write {output}: {first_line(err)}") from None
    return output


def check_inputs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs unlike the traced example: one unpadded row, left padding, right padding, a longer batch."""
    vocab, longest = model.config.text_config.vocab_size, max_length(model)
    generator = torch.Generator().manual_seed(1)
    cases = []
    for batch, length, pad, side in [
        (1, 5, 0, "left"),
        (3, 13, 4, "left"),
        (2, 21, 6, "right"),
        (4, 40, 9, "left"),
    ]:
        length = min(length, longest)
        pad = min(pad, length - 1)
        ids = torch.randint(0, vocab, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        if side == "left":
            mask[-1, :pad] = 0
        else:
            mask[-1, length - pad :] = 0
        cases.append((ids, mask))
    return cases


def max_difference(model: nn.Module, path: str | Path, fmt: str) -> float | None:
    """Largest difference between the exported file's logits and the model's, at real tokens, over
    :func:`check_inputs`. None when ONNX Runtime is not installed to run an ONNX file.

    Padding positions are left out: their logits mean nothing, and runtimes disagree about
    attention rows whose every key is masked (for the bare backbone too).
    """
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
            return torch.from_numpy(session.run(None, feed)[0])
    else:
        run = torch.export.load(str(path)).module()
    worst = 0.0
    model = model.eval()
    with torch.no_grad():
        for ids, mask in check_inputs(model):
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            real = mask.bool()
            worst = max(worst, (run(ids, mask)[real] - expected[real]).abs().max().item())
    return worst


def _write_onnx(program: torch.export.ExportedProgram, output: Path, root: nn.Module) -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter translates through it)
    except ImportError:
        raise DharmaError(
            "ONNX export needs the onnx and onnxscript packages",
            hint="pip install 'dharma-kernel[export]'",
        ) from None
    chatty = logging.getLogger("torch.onnx")
    level = chatty.level
    chatty.setLevel(logging.ERROR)  # notes about optional torchvision ops it skips
    try:
        onnx_program = torch.onnx.export(
            program, input_names=list(INPUTS), output_names=list(OUTPUTS), dynamo=True, verbose=False
        )
        onnx_program.save(str(output))
    except Exception as err:
        ops = _operators_named(err)
        # the exporter decomposes operators first, so the name it gives may not be in our graph:
        # then each module is exported alone to find the ones that fail
        owners = _modules_using(program, ops, root) or _failing_alone(root)
        where = f" at {', '.join(ops)} in module {', '.join(owners)}" if owners else ""
        raise DharmaError(
            f"ONNX export failed{where}: {_cause(err)}",
            hint="Export with --format torch-export, or leave that module out of the manifest.",
        ) from None
    finally:
        chatty.setLevel(level)


# -- naming the module that failed --------------------------------------------------------------


@contextlib.contextmanager
def _innermost_module(model: nn.Module) -> Iterator[list[str]]:
    """While tracing, ``running[-1]`` is the ref of the Dharma module whose forward is executing."""
    running: list[str] = []

    def enter(module: nn.Module, args: Any) -> None:
        running.append(module.ref())

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        running.pop()  # returns None: a forward hook's return value would replace the output

    handles = []
    for module in model.modules():
        if isinstance(module, DharmaModule):
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield running
    finally:
        for handle in handles:
            handle.remove()


def _export_error(running: list[str], err: Exception) -> DharmaError:
    if running:
        return DharmaError(
            f"module {running[-1]} cannot be exported: {first_line(err)}",
            hint="Its forward uses an operation torch.export cannot trace (Python control flow on "
            "tensor values, .item(), numpy); remove the module from the manifest or fix the plugin.",
        )
    return DharmaError(f"the model cannot be exported: {first_line(err)}")


def _chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _cause(err: BaseException) -> str:
    """The innermost error's first line: torch.onnx wraps the reason in pages of advice."""
    return first_line(_chain(err)[-1])


def _operators_named(err: BaseException) -> list[str]:
    """``aten._linalg_eigh``-style operator names in the error and its causes."""
    text = "\n".join(str(e) for e in _chain(err))
    pairs = re.findall(r"\b(aten|prims)[.:]{1,2}(\w+)", text)
    return list(dict.fromkeys(f"{namespace}.{name}" for namespace, name in pairs))


def _modules_using(program: torch.export.ExportedProgram, ops: list[str], root: nn.Module) -> list[str]:
    """Refs of the Dharma modules whose forward calls one of ``ops`` in ``program`` (traced from ``root``)."""
    refs: list[str] = []
    for node in program.graph.nodes:
        target = node.target
        name = f"{getattr(target, 'namespace', '')}.{getattr(target, '_opname', '')}"
        if node.op != "call_function" or name not in ops:
            continue
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            try:
                module = root.get_submodule(path) if path else None
            except AttributeError:
                continue
            if isinstance(module, DharmaModule) and module.ref() not in refs:
                refs.append(module.ref())
    return refs


class _ModuleAlone(nn.Module):
    def __init__(self, module: DharmaModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.module(hidden, ModuleContext(attention_mask)).hidden


def _failing_alone(root: nn.Module) -> list[str]:
    """Refs of the modules that do not convert to ONNX on their own (one instance of each)."""
    instances: dict[str, DharmaModule] = {}
    for module in root.modules():
        if isinstance(module, DharmaModule):
            instances.setdefault(module.ref(), module)
    failing = []
    for ref, module in instances.items():
        hidden = torch.randn(2, 8, module.hidden_size, generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 8, dtype=torch.long)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                alone = torch.export.export(_ModuleAlone(module), (hidden, mask))
                torch.onnx.export(alone, dynamo=True, verbose=False)
        except Exception:
            failing.append(ref)
    return failing
