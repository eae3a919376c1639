"""The pluggy manager for ``dharma.hooks`` plugins: loaded on first use, each in isolation.

A hook module that fails to import or register, and an implementation that
raises when called through :func:`call_hook`, lands in :data:`failures` with
the reason; every other hook keeps working.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import error_line
from .registry import HOOKS_GROUP, entry_points

__all__ = ["call_hook", "failures", "get_plugin_manager", "hook_entry_points"]

# (entry point, reason) for every hook plugin that failed to load or to run
failures: list[tuple[metadata.EntryPoint, str]] = []

_manager: pluggy.PluginManager | None = None
_sources: dict[str, metadata.EntryPoint] = {}  # registered plugin name -> its entry point


def hook_entry_points() -> list[metadata.EntryPoint]:
    """The installed ``dharma.hooks`` entry points; metadata only, nothing imported."""
    return entry_points(HOOKS_GROUP)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, with every loadable ``dharma.hooks`` module registered."""
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager("dharma")
        manager.add_hookspecs(hookspecs)
        for ep in hook_entry_points():
            reason = _register(manager, ep)
            if reason is not None:
                failures.append((ep, reason))
        _manager = manager
    return _manager


def _register(manager: pluggy.PluginManager, ep: metadata.EntryPoint) -> str | None:
    """Register the hook module ``ep`` names; why it could not be, or None."""
    name = f"{ep.dist.name if ep.dist else '?'}:{ep.name}"
    try:
        plugin = ep.load()
        manager.register(plugin, name=name)
    except Exception as err:  # a broken hook plugin is reported, never fatal
        return error_line(err)
    # A misspelt hook name is never called and pluggy says nothing: report it.
    unknown = [caller.name for caller in manager.get_hookcallers(plugin) or [] if not caller.has_spec()]
    if unknown:
        manager.unregister(plugin)
        return f"implements unknown hook {', '.join(unknown)}; the hooks are in dharma_kernel.hookspecs"
    _sources[name] = ep
    return None


def call_hook(name: str, **kwargs: Any) -> list[Any]:
    """Call every implementation of hook ``name``; the results of those that did not raise."""
    results = []
    for impl in getattr(get_plugin_manager().hook, name).get_hookimpls():
        if impl.wrapper or impl.hookwrapper:  # wrappers only make sense around pluggy's own calls
            continue
        try:
            result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except Exception as err:
            failures.append((_sources[impl.plugin_name], f"{name} raised {error_line(err)}"))
        else:
            results.append(result)
    return results
