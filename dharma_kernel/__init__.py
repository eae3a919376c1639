"""Dharma kernel: Hugging Face causal LMs with pluggable neural modules, assembled from a manifest.

Importing the package is cheap (no torch): the CLI's listing commands rely on it.
Heavy names load on first use, and the model registers itself with transformers'
Auto classes as soon as transformers is imported, so that
``AutoModelForCausalLM.from_pretrained(<saved dharma dir>)`` works after
``import dharma_kernel``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from .errors import DharmaError
from .version import MODULE_API, __version__

__all__ = [
    "MODULE_API",
    "DharmaConfig",
    "DharmaError",
    "DharmaModel",
    "DharmaModule",
    "HeadModule",
    "ModuleConfig",
    "ModuleContext",
    "ModuleOutput",
    "__version__",
]

_LAZY = {
    "DharmaConfig": "model",
    "DharmaModel": "model",
    "DharmaModule": "protocol",
    "HeadModule": "protocol",
    "ModuleConfig": "protocol",
    "ModuleContext": "protocol",
    "ModuleOutput": "protocol",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_with_transformers() -> None:
    if _importing_own_module():
        return  # one of ours imported transformers; dharma_kernel.model registers when it loads
    try:
        importlib.import_module(".model", __name__)  # registers on import
    except Exception as err:  # never break `import transformers` for the user
        warnings.warn(f"dharma_kernel could not register with transformers: {err}", stacklevel=2)


def _importing_own_module() -> bool:
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith(f"{__name__}.")
    )


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs the registration right after ``transformers`` finishes importing."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            execute(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
