"""The pluggy manager for ``dharma.hooks`` plugins: loaded on first use, each in isolation.

A hook module that fails to import or register, and an implementation that
raises when called through :func:`call_hook`, lands in :data:`failures` with
the reason; every other hook keeps working.
"""

from __future__ import annotations

import contextlib
import sys
import time
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import error_line
from .registry import HOOKS_GROUP, allowed, call_with_timeout, entry_points, import_timeout, trace

__all__ = ["call_hook", "failures", "get_plugin_manager", "hook_entry_points"]

# (entry point, reason) for every hook plugin that failed to load or to run
failures: list[tuple[metadata.EntryPoint, str]] = []

_manager: pluggy.PluginManager | None = None
_sources: dict[str, metadata.EntryPoint] = {}  # registered plugin name -> its entry point


def hook_entry_points() -> list[metadata.EntryPoint]:
    """The installed ``dharma.hooks`` entry points that may load; metadata only, nothing imported.

    DHARMA_PLUGINS and ``--no-plugin`` name a hook plugin by its entry point or distribution.
    """
    return [ep for ep in entry_points(HOOKS_GROUP) if allowed(ep.name, ep.dist.name if ep.dist else None)]


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
    start = time.perf_counter()
    timeout = import_timeout()
    try:
        # Every command loads hooks: one that prints must not corrupt stdout, one that hangs must not hang it.
        with contextlib.redirect_stdout(sys.stderr):
            done, plugin = call_with_timeout(ep.load, timeout)
        if not done:
            return f"import did not finish within {timeout:g} s"
        manager.register(plugin, name=name)
    except Exception as err:  # a broken hook plugin is reported, never fatal
        return error_line(err)
    trace(
        f"loaded hooks {ep.name} from {name.rpartition(':')[0]} ({ep.value}) in "
        f"{1000 * (time.perf_counter() - start):.1f} ms"
    )
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
