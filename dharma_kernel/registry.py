"""Find module and head plugins through entry points; list them without importing, load them lazily.

Listing reads distribution metadata only (no torch, no plugin code), so ``dharma plugins``
stays fast and one broken plugin never hides the others. :func:`load` imports a plugin's
class the first time it is needed and turns every way that can fail into a
:class:`PluginBroken` naming the distribution to reinstall or upgrade.

A plugin distribution declares its class and, for listing without import, the
MODULE_API it was written for::

    [project.entry-points."dharma.modules"]
    "darshanas.vedanta" = "dharma_plugin_vedanta:Vedanta"

    [project.entry-points."dharma.api"]
    "darshanas.vedanta" = "1.0"
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from importlib import metadata

from .catalogue import FAMILIES, distribution_for, families_of, family_problem
from .errors import DharmaError, error_line
from .suggest import closest, matching_refs
from .version import MODULE_API

__all__ = [
    "FAMILIES",
    "GROUPS",
    "PluginBroken",
    "PluginInfo",
    "PluginWarning",
    "allowed",
    "check",
    "clear_cache",
    "disable",
    "disabled_plugins",
    "discover",
    "distribution_for",
    "entry_points",
    "families",
    "load",
    "resolve",
    "trace",
]

GROUPS = {"module": "dharma.modules", "head": "dharma.heads"}
API_GROUP = "dharma.api"
HOOKS_GROUP = "dharma.hooks"
ALLOW_ENV = "DHARMA_PLUGINS"  # comma-separated refs, names or distributions; set but empty: none load
TRACE_ENV = "DHARMA_TRACE_PLUGINS"  # 1: print to stderr what loaded, from where, in how long
TIMEOUT_ENV = "DHARMA_IMPORT_TIMEOUT"  # seconds an import may take where a hang must not block (--check)
DEFAULT_TIMEOUT = 30.0

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_VALUE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # package.module:Class
_API = re.compile(r"(\d+)\.(\d+)")


@dataclass(frozen=True)
class PluginInfo:
    """One installed module or head as its distribution's metadata describes it; nothing imported.

    ``problem`` is set when the metadata alone shows the plugin cannot be used
    (bad ref, unknown family, missing or incompatible MODULE_API, ref provided twice).
    """

    kind: str  # "module" | "head"
    ref: str  # "darshanas.vedanta" | "qa"
    family: str | None  # "darshanas" for modules, None for heads
    name: str  # "vedanta"
    value: str  # "dharma_plugin_vedanta:Vedanta"
    distribution: str | None
    version: str | None
    module_api: str | None  # from group dharma.api
    problem: str | None = None
    disabled: str | None = None  # why DHARMA_PLUGINS or --no-plugin keeps it from loading

    @property
    def install_name(self) -> str:
        """The distribution to pip install, reinstall or upgrade for this plugin."""
        return self.distribution or distribution_for(self.ref, self.kind)


class PluginBroken(DharmaError):
    """An installed plugin that cannot be used; ``reason`` says why, the hint what to run."""

    def __init__(self, info: PluginInfo, reason: str, *, hint: str | None = None) -> None:
        self.info = info
        self.reason = reason
        dist = info.install_name
        super().__init__(
            f"{info.kind} plugin '{info.ref}' from {dist} is broken: {reason}",
            hint=hint or f"reinstall or upgrade it: pip install --upgrade --force-reinstall {dist}",
        )


class PluginWarning(UserWarning):
    """A plugin that loads but may misbehave (written for a newer MODULE_API minor)."""


def entry_points(group: str) -> list[metadata.EntryPoint]:
    """The installed entry points of ``group``, read once per ``sys.path``."""
    return list(_scan(tuple(sys.path)).select(group=group))


@functools.lru_cache(maxsize=8)
def _scan(path: tuple[str, ...]) -> metadata.EntryPoints:
    # ``path`` only keys the cache: importlib.metadata reads sys.path itself.
    return metadata.entry_points()


def clear_cache() -> None:
    """Forget scanned metadata and loaded classes (after installing plugins in a running process)."""
    _scan.cache_clear()
    _loaded.clear()
    _hung.clear()


def _kinds(kind: str | None) -> tuple[str, ...]:
    if kind is None:
        return tuple(GROUPS)
    if kind not in GROUPS:
        raise DharmaError(f"unknown plugin kind '{kind}'; kinds are: {', '.join(GROUPS)}")
    return (kind,)


def discover(kind: str | None = None, *, disabled: bool = False) -> list[PluginInfo]:
    """Every installed plugin of ``kind`` (both when None), from metadata only, sorted by ref.

    Plugins that DHARMA_PLUGINS or ``--no-plugin`` leave out are not returned, unless
    ``disabled`` (for listings), and then with ``disabled`` saying why.
    """
    infos = _described(kind)
    off = [info for info in infos if info.disabled]
    _trace_discovery(len(infos), off)
    found = _mark_duplicates([info for info in infos if not info.disabled]) + (off if disabled else [])
    return sorted(found, key=lambda i: (i.ref, i.kind, i.distribution or ""))


def families() -> dict[str, list[str]]:
    """Every family a manifest may name, standard ones first, with its installed module refs.

    A family that only an installed plugin declares (``stoics``) is one of them; plugins
    that DHARMA_PLUGINS or ``--no-plugin`` leave out, or whose family is unusable, add none.
    """
    refs = [info.ref for info in discover("module") if family_problem(info.family or "") is None]
    return {family: [ref for ref in refs if ref.split(".")[0] == family] for family in families_of(refs)}


def disabled_plugins(kind: str | None = None) -> list[PluginInfo]:
    """The installed plugins of ``kind`` that DHARMA_PLUGINS or ``--no-plugin`` keep from loading."""
    return [info for info in _described(kind) if info.disabled]


def _described(kind: str | None) -> list[PluginInfo]:
    apis = {(_dist_name(ep), ep.name): ep.value for ep in entry_points(API_GROUP)}
    infos = [_describe(k, ep, apis) for k in _kinds(kind) for ep in entry_points(GROUPS[k])]
    return [replace(info, disabled=_why_disabled(info.ref, info.name, info.distribution)) for info in infos]


_disabled_by_flag: set[str] = set()


def disable(names: Iterable[str], *, reset: bool = False) -> None:
    """``--no-plugin``: refs, short names or distributions that must not load in this process.

    ``reset`` first forgets earlier ones (each ``main()`` call is a new command line).
    """
    if reset:
        _disabled_by_flag.clear()
    _disabled_by_flag.update(name.strip() for name in names if name.strip())


def _why_disabled(*names: str | None) -> str | None:
    """Why a plugin known by ``names`` (ref, short name, distribution) must not load, or None."""
    known = {name for name in names if name}
    flagged = sorted(known & _disabled_by_flag)
    if flagged:
        return f"disabled by --no-plugin {flagged[0]}"
    allow = os.environ.get(ALLOW_ENV)
    if allow is not None and not known & {part.strip() for part in allow.split(",")}:
        return f"not in {ALLOW_ENV}={allow}"
    return None


def allowed(*names: str | None) -> bool:
    """Whether a plugin known by ``names`` may load (hook plugins use this too)."""
    return _why_disabled(*names) is None


def trace(message: str) -> None:
    """One line on stderr when DHARMA_TRACE_PLUGINS is set: what loaded, from where, how long it took."""
    if os.environ.get(TRACE_ENV, "") not in ("", "0"):
        print(f"dharma trace: {message}", file=sys.stderr, flush=True)


_traced_discovery: set[tuple[int, tuple[str, ...]]] = set()


def _trace_discovery(count: int, off: list[PluginInfo]) -> None:
    key = (count, tuple(f"{i.kind}:{i.ref}" for i in off))
    if key in _traced_discovery:  # discover() runs several times per command: say it once
        return
    _traced_discovery.add(key)
    trace(f"{count} plugin entry points in metadata, {len(off)} disabled")
    for info in off:
        trace(f"skipped {info.kind} {info.ref} from {info.distribution}: {info.disabled}")


def _dist_name(ep: metadata.EntryPoint) -> str | None:
    return ep.dist.name if ep.dist is not None else None


def _describe(kind: str, ep: metadata.EntryPoint, apis: dict[tuple[str | None, str], str]) -> PluginInfo:
    family, name = None, ep.name
    if kind == "module" and "." in ep.name:
        family, _, name = ep.name.partition(".")
    dist = _dist_name(ep)
    info = PluginInfo(
        kind=kind,
        ref=ep.name,
        family=family,
        name=name,
        value=ep.value,
        distribution=dist,
        version=ep.dist.version if ep.dist is not None else None,
        module_api=apis.get((dist, ep.name)),
    )
    return replace(info, problem=_metadata_problem(info))


def _metadata_problem(info: PluginInfo) -> str | None:
    if info.kind == "module":
        if info.family is None or not (_NAME.fullmatch(info.family) and _NAME.fullmatch(info.name)):
            return f"ref '{info.ref}' is not '<family>.<name>' in lower case"
        if family_problem(info.family):
            return family_problem(info.family)
    elif not _NAME.fullmatch(info.ref):
        return f"head ref '{info.ref}' is not a lower-case name"
    if not _VALUE.fullmatch(info.value):
        return f"entry point value '{info.value}' is not 'package.module:Class'"
    if info.module_api is None:
        return f"no MODULE_API declared (entry point '{info.ref}' in group {API_GROUP})"
    return _api_problem(info.module_api)


def _api_problem(api: object) -> str | None:
    """Why a plugin written for ``api`` cannot run on this kernel, or None."""
    parsed = _parse_api(api)
    if parsed is None:
        return f"MODULE_API {api!r} is not '<major>.<minor>'"
    if parsed[0] != _parse_api(MODULE_API)[0]:
        return f"written for MODULE_API {api}, this kernel speaks {MODULE_API}"
    return None


def _parse_api(api: object) -> tuple[int, int] | None:
    match = _API.fullmatch(api) if isinstance(api, str) else None
    return (int(match[1]), int(match[2])) if match else None


def _mark_duplicates(infos: list[PluginInfo]) -> list[PluginInfo]:
    by_ref: dict[tuple[str, str], list[PluginInfo]] = defaultdict(list)
    for info in infos:
        by_ref[info.kind, info.ref].append(info)
    marked = []
    for same in by_ref.values():
        for info in same:
            if len(same) > 1:
                others = ", ".join(sorted({o.distribution or "?" for o in same if o is not info}))
                info = replace(info, problem=f"'{info.ref}' is also provided by {others}; uninstall one")
            marked.append(info)
    return marked


def resolve(ref: str, kind: str = "module") -> PluginInfo:
    """The installed plugin named ``ref``: a full ref, or a short name that only one module has."""
    infos = discover(kind)
    found = matching_refs(ref, sorted({info.ref for info in infos}))
    if len(found) == 1:
        return next(info for info in infos if info.ref == found[0])
    if found:
        hint = f"write the full ref, e.g. '{found[0]}'"
        raise DharmaError(f"'{ref}' is ambiguous: it names {' and '.join(found)}", hint=hint)
    raise _not_installed(ref, kind, infos)


def why_disabled(ref: str, kind: str = "module") -> str | None:
    """For an installed plugin that DHARMA_PLUGINS or ``--no-plugin`` keeps from loading:
    ``"is installed but <why>; to enable it, <how>"``. None for any other plugin."""
    off = [info for info in disabled_plugins(kind) if ref in (info.ref, info.name)]
    if not off:
        return None
    info = off[0]
    flagged = sorted({info.ref, info.name, info.distribution} & _disabled_by_flag)
    how = f"drop --no-plugin {flagged[0]}" if flagged else f"add {info.ref} to {ALLOW_ENV}"
    return f"is installed but {info.disabled}; to enable it, {how}"


def _not_installed(ref: str, kind: str, infos: list[PluginInfo]) -> DharmaError:
    off = [info for info in disabled_plugins(kind) if ref in (info.ref, info.name)]
    if off:
        why = why_disabled(ref, kind)
        return DharmaError(f"{kind} plugin '{off[0].ref}' from {off[0].distribution} {why}")
    message = f"no {kind} plugin '{ref}' is installed"
    full = {info.name: info.ref for info in infos}  # short name -> ref, to suggest the full ref
    close = closest(ref, [info.ref for info in infos] + list(full))
    if close:
        message += f"; did you mean '{full.get(close, close)}'?"
    other = "head" if kind == "module" else "module"
    if any(ref in (info.ref, info.name) for info in discover(other)):
        message += f" ('{ref}' is a {other} plugin)"
    install = f"pip install {distribution_for(ref, kind)}"
    hint = (
        f"if '{ref}' is a plugin you have not installed: {install}" if close else f"to install it: {install}"
    )
    return DharmaError(message, hint=hint)


_loaded: dict[PluginInfo, type] = {}
_MISSING = object()


def load(info: PluginInfo) -> type:
    """Import the plugin's class (once); raise :class:`PluginBroken` when it cannot be used."""
    cls = _loaded.get(info)
    if cls is None:
        if info in _hung:
            raise PluginBroken(info, _hung[info])
        _import_protocol()
        start = time.perf_counter()
        try:
            cls = _loaded[info] = _import(info)
        except PluginBroken as err:
            trace(f"{info.kind} {info.ref} from {_where(info)} is broken ({_ms(start)}): {err.reason}")
            raise
        source = getattr(sys.modules.get(cls.__module__), "__file__", None) or cls.__module__
        trace(f"loaded {info.kind} {info.ref} from {_where(info)} at {source} in {_ms(start)}")
    return cls


def _import_protocol() -> None:
    # torch comes with the protocol: timed apart, so a plugin's own import time is not hidden by it
    if "dharma_kernel.protocol" not in sys.modules:
        start = time.perf_counter()
        from . import protocol  # noqa: F401

        trace(f"imported dharma_kernel.protocol (torch) in {_ms(start)}")


def _where(info: PluginInfo) -> str:
    return f"{info.distribution} {info.version}" if info.distribution else "no distribution"


def _ms(start: float) -> str:
    return f"{1000 * (time.perf_counter() - start):.1f} ms"


def _import(info: PluginInfo) -> type:
    if info.problem is not None:
        raise PluginBroken(info, info.problem, hint=_api_hint(info, info.module_api))
    from .protocol import DharmaModule, HeadModule  # imports torch: only once a plugin is really needed

    module_name, _, attr = info.value.partition(":")
    try:
        nowhere = importlib.util.find_spec(module_name.partition(".")[0]) is None
    except (ImportError, ValueError):
        nowhere = False  # the import below says what is wrong
    if nowhere:
        raise PluginBroken(
            info, f"its entry point names {info.value}, but no module {module_name} is installed"
        )
    try:
        obj = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:
        raise PluginBroken(info, f"importing {module_name} raised {error_line(err)}") from err
    for part in attr.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            raise PluginBroken(info, f"{module_name} has no attribute '{attr}'")
    base = DharmaModule if info.kind == "module" else HeadModule
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise PluginBroken(info, f"{info.value} is not a {base.__name__} subclass")
    api = getattr(obj, "module_api", None)
    problem = _api_problem(api)
    if problem is not None:
        raise PluginBroken(info, f"class {problem}", hint=_api_hint(info, api))
    declared = getattr(obj, "name", "?")
    if info.kind == "module":
        declared = f"{getattr(obj, 'family', '?')}.{declared}"
    if declared != info.ref:
        raise PluginBroken(info, f"{info.value} declares itself '{declared}', not '{info.ref}'")
    if _parse_api(api)[1] > _parse_api(MODULE_API)[1]:
        warnings.warn(
            f"{info.kind} plugin '{info.ref}' was written for MODULE_API {api}, newer than this kernel's "
            f"{MODULE_API}; upgrade the kernel: pip install --upgrade dharma-kernel",
            PluginWarning,
            stacklevel=3,
        )
    return obj


def _api_hint(info: PluginInfo, api: object) -> str | None:
    parsed, kernel = _parse_api(api), _parse_api(MODULE_API)
    if parsed is None or parsed[0] == kernel[0]:
        return None
    if parsed[0] > kernel[0]:
        return "upgrade the kernel: pip install --upgrade dharma-kernel"
    return f"upgrade the plugin: pip install --upgrade {info.install_name}"


def check(info: PluginInfo, timeout: float | None = None) -> str | None:
    """Load ``info`` in this process; the reason it is broken, or None when it loads.

    With ``timeout``, an import still running after that many seconds is abandoned (its
    thread is left behind; the process should exit soon) and reported as broken.
    """
    if timeout is None:
        return _check(info)
    _import_protocol()  # torch's own import time must not count against the plugin
    done, result = call_with_timeout(lambda: _check(info), timeout)
    if not done:
        _hung[info] = f"import did not finish within {timeout:g} s (set {TIMEOUT_ENV} to wait longer)"
        trace(f"{info.kind} {info.ref} from {_where(info)}: {_hung[info]}")
        return _hung[info]
    return result


_hung: dict[PluginInfo, str] = {}


def _check(info: PluginInfo) -> str | None:
    try:
        load(info)
    except PluginBroken as err:
        return err.reason
    except Exception as err:  # a plugin misbehaving in an unforeseen way must not break a listing
        return error_line(err)
    return None


def import_timeout() -> float:
    """DHARMA_IMPORT_TIMEOUT in seconds (30 when unset or not a positive number)."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def call_with_timeout(fn: Callable[[], object], timeout: float) -> tuple[bool, object]:
    """``(True, fn())`` or, when ``fn`` is still running after ``timeout`` seconds, ``(False, None)``.

    ``fn`` runs in a daemon thread: Python cannot stop an import midway, but it can stop
    waiting for one, and a daemon thread does not keep the process alive at exit.
    """
    box: list[object] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)

    thread = threading.Thread(target=run, name="dharma-plugin-import", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None
    if failure:
        raise failure[0]
    return True, box[0]
