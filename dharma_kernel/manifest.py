"""The schema of ``manifest.toml`` and the messages a bad manifest gets.

Imports only the standard library, pydantic and packaging, so ``dharma validate``
stays cheap. Which plugins exist, whether layers fit the backbone and whether
module overrides fit a plugin's ``Config`` are checked where those are known;
they report through :func:`format_validation_error` so every message reads alike.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

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
from .validation import describe, format_validation_error

__all__ = [
    "FAMILIES",
    "BackboneSection",
    "DataSection",
    "FinetuneSection",
    "FreezeSection",
    "HeadSpec",
    "LossSection",
    "Manifest",
    "ModelSection",
    "ModulesSection",
    "TrainSection",
    "TrainedTokenizer",
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


class TrainedTokenizer(_Section):
    """``tokenizer = { train = true, vocab_size = 8000 }``: a byte-level BPE trained on the corpus."""

    train: Literal[True]
    vocab_size: int | None = Field(None, ge=300)  # None: the backbone's vocabulary size
    min_frequency: int = Field(2, ge=1)
    # Text the BPE learns from, at most: the corpus's first this many characters. The trainer
    # counts words, so memory follows the vocabulary of the sample, not its size.
    DEFAULT_CHARS: ClassVar[int] = 100_000_000
    max_training_chars: int = Field(DEFAULT_CHARS, ge=1)


class BackboneSection(_Section):
    """Exactly one of ``pretrained`` (HF hub id or local directory) or ``config`` (fresh weights).

    ``tokenizer``: a hub id or directory, or a table asking for a BPE trained on the
    corpus. Unset, a pretrained backbone brings its own and a fresh one gets a trained BPE.
    """

    pretrained: str | None = Field(None, min_length=1)
    # HF config keys plus `architecture`; the backbone loader checks the keys.
    config: dict[str, Any] | None = None
    tokenizer: Annotated[str, Field(min_length=1)] | TrainedTokenizer | None = None

    @field_validator("config")
    @classmethod
    def _default_architecture(cls, config: dict[str, Any] | None) -> dict[str, Any] | None:
        if config is None:
            return None
        architecture = config.get("architecture", "gpt2")
        if not isinstance(architecture, str):
            raise ValueError(f"'architecture' must be a string, got {describe(architecture)}")
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
    capacity_factor: float | None = Field(None, gt=0)  # routed training: fixed slots per module
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
    routing: float = Field(1.0, ge=0)  # routers learn the concept labels: a concept's tokens go to its module
    # share of the routing loss's gradient that reaches the backbone: more detects concepts sooner,
    # at some cost in perplexity (see README, "What a module's score means")
    routing_backbone: float = Field(0.25, ge=0, le=1)


class DataSection(_Section):
    train: list[str] = []
    eval: list[str] = []
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(256, ge=8)
    min_chars: int = Field(20, ge=0)  # records shorter than this after cleaning are dropped
    strict: bool = False  # a malformed file or record stops the run instead of being skipped


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
    # Tokens each evaluation reads at most: rows drawn once from train.seed and kept for the run. 0: all.
    eval_tokens: int = Field(65_536, ge=0)
    save_every: int | None = Field(None, ge=1)  # None: at every eval
    keep_last: int = Field(2, ge=1)  # step checkpoints kept besides latest/ and best/
    log_every: int = Field(10, ge=1)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 turns clipping off
    optimizer_in_backward: bool = False  # step each parameter as its gradient is ready, then free it
    optimizer_state: Literal["fp32", "bf16"] = "fp32"  # AdamW moments' dtype
    max_nonfinite: int = Field(5, ge=1)  # consecutive skipped non-finite steps that stop the run
    tensorboard: bool = False
    # Under torchrun: "ddp" keeps a whole copy of the model per process; "fsdp" shards parameters,
    # gradients and optimizer state over the processes (FSDP2), for backbones one card cannot hold.
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # torch.compile the training forward (see train/compiled.py); one process, no gradient
    # checkpointing. compile_mode is torch.compile's mode ("reduce-overhead": CUDA graphs on CUDA).
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"


class FinetuneSection(_Section):
    """``[finetune] from = "runs/foundation"``: train the ``[[heads]]`` (or, without one, the LM) on
    ``[data]`` starting from a saved model or run directory, instead of assembling a new model.

    ``train.output`` is then the application directory; the run's checkpoints go beside it
    (``<output>-run``). ``merge``: write a standalone model directory instead of an application.
    When ``[train]`` sets neither ``epochs`` nor ``max_steps``, the run takes at least
    :data:`~dharma_kernel.train.finetune.MIN_STEPS` steps (small data needs many epochs).
    """

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    from_: str = Field(alias="from", min_length=1)
    merge: bool = False
    # Which checkpoint becomes the application: the best eval score of the head's first metric
    # ("metric"; the LM's eval loss without a head), the lowest eval loss, or the last one.
    # None: "metric" with an eval set, else "last".
    select: Literal["loss", "metric", "last"] | None = None
    # With an eval set: stop once that many evaluations in a row found no better checkpoint (0: never).
    patience: int = Field(5, ge=0)


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
    finetune: FinetuneSection | None = None

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
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)

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
