"""The schema of ``manifest.toml`` and the messages a bad manifest gets.

Imports only the standard library, pydantic and packaging, so ``dharma validate``
stays cheap. Which plugins exist, whether layers fit the backbone and whether
module overrides fit a plugin's ``Config`` are checked where those are known;
they report through :func:`format_validation_error` so every message reads alike.
"""

from __future__ import annotations

import json
import re
import tomllib
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from packaging.requirements import InvalidRequirement, Requirement
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .catalogue import FAMILIES
from .errors import DharmaError, first_line
from .suggest import closest

__all__ = [
    "FAMILIES",
    "BackboneSection",
    "DataSection",
    "FreezeSection",
    "HeadSpec",
    "LossSection",
    "Manifest",
    "ModelSection",
    "ModulesSection",
    "TrainSection",
    "check_requires",
    "closest",
    "format_validation_error",
    "load_manifest",
    "parse_manifest",
]


DEFAULT_BACKBONE = "distilgpt2"


class _Section(BaseModel):
    # strict: TOML values are already typed, so "8" for an integer is a mistake, not a conversion.
    model_config = ConfigDict(extra="forbid", strict=True)


def _valid_requirement(text: str) -> str:
    try:
        Requirement(text)
    except InvalidRequirement as e:
        raise ValueError(f"{text!r} is not a valid requirement: {first_line(e)}") from None
    return text


class ModelSection(_Section):
    name: str = Field("dharma-model", min_length=1)


class BackboneSection(_Section):
    """Exactly one of ``pretrained`` (HF hub id or local directory) or ``config`` (fresh weights)."""

    pretrained: str | None = Field(None, min_length=1)
    # HF config keys plus `architecture`; the backbone loader checks the keys.
    config: dict[str, Any] | None = None
    tokenizer: str | None = Field(None, min_length=1)

    @field_validator("config")
    @classmethod
    def _default_architecture(cls, config: dict[str, Any] | None) -> dict[str, Any] | None:
        if config is None:
            return None
        architecture = config.get("architecture", "gpt2")
        if not isinstance(architecture, str):
            raise ValueError(f"'architecture' must be a string, got {_describe(architecture)}")
        return {"architecture": architecture, **config}

    @model_validator(mode="after")
    def _one_source(self) -> BackboneSection:
        if self.pretrained is not None and self.config is not None:
            raise ValueError("set either 'pretrained' or 'config', not both")
        if self.pretrained is None and self.config is None:
            raise ValueError(
                "set 'pretrained' (a Hugging Face model id or local directory) "
                "or 'config' (a table of model config keys, for fresh weights)"
            )
        return self


class ModulesSection(_Section):
    preset: Literal["tiny", "lite", "seed"] = "lite"
    include: list[str] = []
    exclude: list[str] = []
    at_layers: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, validate_default=True)
    composition: Literal["sequential", "parallel", "routed"] = "sequential"
    top_k: int = Field(2, ge=1)
    override: dict[str, dict[str, Any]] = {}

    @field_validator("at_layers")
    @classmethod
    def _check_layers(cls, layers: list[int], info: ValidationInfo) -> list[int]:
        repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
        if repeated:
            raise ValueError(f"each layer may appear once; repeated: {', '.join(map(str, repeated))}")
        if info.data.get("include") and not layers:
            raise ValueError(
                "required when 'include' names modules; list the backbone layers to insert them at, "
                "e.g. at_layers = [2, 4]"
            )
        return sorted(layers)


class HeadSpec(_Section):
    plugin: str = Field(min_length=1)
    config: dict[str, Any] = {}


class FreezeSection(_Section):
    groups: list[str] = []


class LossSection(_Section):
    lm: float = Field(1.0, ge=0)
    concept: float = Field(0.1, ge=0)
    router: float = Field(0.01, ge=0)  # load balance of routed stacks; the Switch Transformer's weight


class DataSection(_Section):
    train: list[str] = []
    eval: list[str] = []
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(256, ge=8)


class TrainSection(_Section):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, le=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    output: str | None = Field(None, min_length=1)  # None until the manifest fills in runs/<model.name>
    seed: int = 0
    eval_every: int = Field(200, ge=1)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 turns clipping off


class Manifest(_Section):
    requires: list[Annotated[str, AfterValidator(_valid_requirement)]] = []
    model: ModelSection = Field(default_factory=ModelSection)
    backbone: BackboneSection = Field(default_factory=lambda: BackboneSection(pretrained=DEFAULT_BACKBONE))
    modules: ModulesSection = Field(default_factory=ModulesSection)
    heads: list[HeadSpec] = []
    freeze: FreezeSection = Field(default_factory=FreezeSection)
    loss: LossSection = Field(default_factory=LossSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)

    # The manifest file, if it came from one; relative paths inside resolve against its directory.
    _path: Path | None = PrivateAttr(default=None)

    @field_validator("heads")
    @classmethod
    def _unique_heads(cls, heads: list[HeadSpec]) -> list[HeadSpec]:
        seen = [head.plugin for head in heads]
        if twice := sorted({name for name in seen if seen.count(name) > 1}):
            raise ValueError(f"each head plugin may appear once; listed more than once: {', '.join(twice)}")
        return heads

    @model_validator(mode="after")
    def _derive_output(self) -> Manifest:
        if self.train.output is None:
            self.train.output = f"runs/{self.model.name}"
        return self

    @property
    def path(self) -> Path | None:
        return self._path

    def resolve_path(self, p: str | Path) -> Path:
        """``p`` as written in the manifest, relative to the manifest's directory (else the cwd)."""
        p = Path(p).expanduser()
        if p.is_absolute():
            return p
        base = self._path.parent if self._path is not None else Path.cwd()
        return base / p

    def to_dict(self) -> dict[str, Any]:
        """The resolved manifest (defaults filled in) as plain JSON-able data."""
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, path: str | Path | None = None) -> Manifest:
        """Inverse of :meth:`to_dict`; ``path`` is the manifest file relative paths refer to."""
        source = str(path) if path is not None else None
        return _validate(data, source, path)


def parse_manifest(text: str, source: str = "<manifest>") -> Manifest:
    """Parse manifest TOML; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DharmaError(_toml_message(e, source)) from None
    return _validate(data, source, None)


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DharmaError(f"{path}: no such manifest file") from None
    except IsADirectoryError:
        raise DharmaError(f"{path}: is a directory; give the manifest's .toml file") from None
    except UnicodeDecodeError as e:
        raise DharmaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DharmaError(f"{path}: cannot read manifest: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DharmaError(_toml_message(e, str(path))) from None
    return _validate(data, str(path), path)


def _validate(data: Mapping[str, Any], source: str | None, path: str | Path | None) -> Manifest:
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        raise DharmaError(format_validation_error(e, model=Manifest, source=source)) from None
    if path is not None:
        manifest._path = Path(path).absolute()
    return manifest


def _toml_message(e: tomllib.TOMLDecodeError, source: str) -> str:
    # Python 3.14 exposes msg/lineno/colno; before that they are only in the text.
    text = str(e)
    msg = getattr(e, "msg", None) or re.sub(r"\s*\((at line \d+, column \d+|at end of document)\)$", "", text)
    line, col = getattr(e, "lineno", None), getattr(e, "colno", None)
    if line is None and (m := re.search(r"at line (\d+), column (\d+)\)$", text)):
        line, col = int(m[1]), int(m[2])
    if line is None:
        return f"{source}: invalid TOML at end of document: {msg}"
    return f"{source}:{line}:{col}: invalid TOML: {msg}"


def check_requires(manifest: Manifest) -> None:
    """Raise a DharmaError listing every ``requires`` entry that is missing or at the wrong version."""
    problems = []
    for text in manifest.requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        install = f"run: pip install '{text}'"
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            problems.append(f"requires: '{text}' is not installed; {install}")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            have = f"{req.name} {installed} is installed"
            problems.append(f"requires: '{text}' is not satisfied, {have}; {install}")
    if problems:
        raise DharmaError("\n".join(problems))


# What an input of the wrong type should have been, by pydantic error type.
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}

_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def format_validation_error(
    err: ValidationError,
    prefix: str = "",
    source: str | None = None,
    *,
    model: type[BaseModel] | None = None,
) -> str:
    """One line per problem: ``[<source>: ]<prefix>.<key.path>: <what is wrong>``.

    ``model`` is the class that was validated; with it, unknown keys and bad choices
    get the closest valid name and union member tags are left out of key paths.
    """
    problems = [_problem(e, model, prefix) for e in err.errors()]
    problems = _merge_union_branches(problems)
    lines = []
    for parts, message in problems:
        where = _key_path(prefix, parts)
        line = f"{where}: {message}" if where else message
        lines.append(f"{source}: {line}" if source else line)
    return "\n".join(dict.fromkeys(lines))


@dataclass
class _Problem:
    parts: tuple  # key path, union member tags left out
    union_at: tuple | None  # key path of the innermost union crossed
    expected: str | None  # set for wrong-type problems
    got: str
    message: str


def _problem(e: Any, model: type[BaseModel] | None, prefix: str) -> _Problem:
    loc, kind, value, ctx = tuple(e["loc"]), e["type"], e.get("input"), e.get("ctx") or {}
    parts, tp, union_at = _follow(model, loc)
    expected, got = None, _describe(value)
    if kind == "extra_forbidden":
        message = "unknown key" + _suggest_key(str(loc[-1]), _follow(model, loc[:-1])[1])
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "literal_error":
        if get_origin(tp) is Literal:
            choices = list(get_args(tp))
        else:  # no model given: read the choices from pydantic's own list
            choices = re.findall(r"'([^']*)'", ctx["expected"])
        message = f"expected one of {', '.join(_describe(c) for c in choices)}, got {got}"
        if isinstance(value, str) and (near := closest(value, [str(c) for c in choices])):
            message += f" (did you mean {near!r}?)"
    elif kind in _EXPECTED:
        expected = _EXPECTED[kind]
        if kind == "list_type" and _is_model_list(tp) and parts and isinstance(parts[-1], str):
            expected = f"an array of tables ([[{_key_path(prefix, parts)}]])"
        message = f"expected {expected}, got {got}"
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # a float field's bound `gt=0` arrives as 0.0
        message = f"must be {_BOUNDS[kind]} {bound}, got {got}"
    elif kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        message = "must not be empty"
    elif kind in ("value_error", "assertion_error") and "error" in ctx:
        message = str(ctx["error"])
    else:
        message = e["msg"]
    return _Problem(parts, union_at, expected, got, message)


def _merge_union_branches(problems: list[_Problem]) -> list[tuple[tuple, str]]:
    """Report a union failure once: by the branch the input was meant for, or as 'expected X or Y'."""
    out: list[tuple[tuple, str]] = []
    seen_unions: set[tuple] = set()
    for p in problems:
        if p.union_at is None:
            out.append((p.parts, p.message))
            continue
        if p.union_at in seen_unions:
            continue
        seen_unions.add(p.union_at)
        group = [q for q in problems if q.union_at == p.union_at]
        shallow = [q for q in group if q.expected is not None and q.parts == q.union_at]
        deep = [q for q in group if q not in shallow]
        if deep:
            out.extend((q.parts, q.message) for q in deep)
        else:
            wanted = " or ".join(dict.fromkeys(q.expected for q in shallow))
            out.append((p.union_at, f"expected {wanted}, got {p.got}"))
    return out


def _follow(model: Any, loc: tuple) -> tuple[tuple, Any, tuple | None]:
    """Walk ``loc`` through the annotations from ``model``.

    Returns the key path without union member tags, the annotation found at its end
    (None when unknown) and the key path of the innermost union crossed, if any.
    """
    tp, parts, union_at = model, [], None
    for seg in loc:
        tp = _unwrap(tp)
        members = _union_members(tp)
        if members is not None:
            # pydantic names the union member that failed; it is no key the user wrote.
            union_at = tuple(parts)
            tp = next((m for m in members if _tag(m) == seg), None)
            continue
        parts.append(seg)
        tp = _child(tp, seg)
    return tuple(parts), _unwrap(tp), union_at


def _unwrap(tp: Any) -> Any:
    """Drop Annotated metadata and Optional: pydantic adds no loc segment for either."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif (members := _union_members(tp, all_members=True)) is not None and len(members) == 1:
            tp = members[0]
        else:
            return tp


def _union_members(tp: Any, all_members: bool = False) -> list | None:
    if get_origin(tp) not in (Union, types.UnionType):
        return None
    members = [m for m in get_args(tp) if m is not type(None)]
    return members if all_members or len(members) > 1 else None


def _tag(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _child(tp: Any, seg: Any) -> Any:
    if _is_model(tp):
        for name, field in tp.model_fields.items():
            if seg in (name, field.alias):
                return field.annotation
        return None
    args = get_args(tp)
    if get_origin(tp) in (list, tuple, set, frozenset) and isinstance(seg, int) and args:
        return args[0]
    if get_origin(tp) in (dict, Mapping) and len(args) == 2:
        return args[1]
    return None


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_model_list(tp: Any) -> bool:
    return get_origin(tp) is list and _is_model(_unwrap(get_args(tp)[0]))


def _suggest_key(key: str, parent: Any) -> str:
    if not _is_model(parent):
        return ""
    valid = [field.alias or name for name, field in parent.model_fields.items()]
    if near := closest(key, valid):
        return f"; did you mean {near!r}?"
    return f"; valid keys: {', '.join(valid)}"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_path(prefix: str, parts: Iterable[Any]) -> str:
    """Key path as TOML spells it: dotted, quoted where a key needs quotes, [i] for array items."""
    path = prefix
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        key = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
        path = f"{path}.{key}" if path else key
    return path


def _describe(value: Any) -> str:
    """A value as the user wrote it in TOML, for 'got ...'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)
