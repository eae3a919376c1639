import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pydantic
import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from dharma_kernel.errors import DharmaError
from dharma_kernel.manifest import (
    FAMILIES,
    Manifest,
    check_requires,
    closest,
    format_validation_error,
    load_manifest,
    parse_manifest,
)

FULL = """\
requires = ["pydantic>=2"]

[model]
name = "dharma-foundation"

[backbone]
pretrained = "distilgpt2"            # HF id or local directory

[modules]
preset = "lite"
include = ["all"]
exclude = ["crisis.career"]
at_layers = [4, 2]
composition = "routed"
top_k = 2

[modules.override."darshanas.vedanta"]
bottleneck = 128

[[heads]]
plugin = "qa"

[[heads]]
plugin = "classification"
config = { labels = ["a", "b"] }

[freeze]
groups = ["backbone"]

[loss]
lm = 1.0
concept = 0.1

[data]
train = ["examples/data/corpus"]
eval_fraction = 0.05
max_length = 96

[train]
epochs = 3
batch_size = 1
grad_accum = 16
learning_rate = 5e-5
precision = "auto"
gradient_checkpointing = true
schedule = "onecycle"
output = "runs/dharma-foundation"
"""


def write(tmp_path: Path, text: str, name: str = "manifest.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(text: str, source: str = "m.toml") -> str:
    with pytest.raises(DharmaError) as info:
        parse_manifest(text, source)
    return str(info.value)


def test_full_manifest_values_and_round_trip(tmp_path):
    m = load_manifest(write(tmp_path, FULL))
    assert m.model.name == "dharma-foundation"
    assert m.backbone.pretrained == "distilgpt2" and m.backbone.config is None
    assert m.modules.at_layers == [2, 4]  # sorted
    assert m.modules.composition == "routed"
    assert m.modules.override == {"darshanas.vedanta": {"bottleneck": 128}}
    assert [(h.plugin, h.config) for h in m.heads] == [("qa", {}), ("classification", {"labels": ["a", "b"]})]
    assert m.freeze.groups == ["backbone"]
    assert m.data.max_length == 96 and m.data.eval == []
    assert (m.train.epochs, m.train.batch_size, m.train.grad_accum) == (3, 1, 16)
    assert m.train.learning_rate == 5e-5 and m.train.gradient_checkpointing is True
    assert m.path == (tmp_path / "manifest.toml").absolute()

    d = m.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["modules"]["override"] == {"darshanas.vedanta": {"bottleneck": 128}}
    again = Manifest.from_dict(json.loads(json.dumps(d)), path=m.path)
    assert again == m
    assert again.to_dict() == d


def test_from_dict_round_trip_without_file():
    m = parse_manifest("[backbone]\nconfig = { n_layer = 2 }\n[train]\nmax_steps = 10\n")
    assert Manifest.from_dict(m.to_dict()) == m
    assert Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()


def test_defaults():
    assert parse_manifest("").to_dict() == {
        "requires": [],
        "model": {"name": "dharma-model"},
        "backbone": {"pretrained": "distilgpt2"},
        "modules": {
            "preset": "lite",
            "include": [],
            "exclude": [],
            "at_layers": [],
            "composition": "sequential",
            "top_k": 2,
            "override": {},
        },
        "heads": [],
        "freeze": {"groups": []},
        "loss": {"lm": 1.0, "concept": 0.1, "router": 0.01, "routing": 1.0, "routing_backbone": 0.25},
        "data": {
            "train": [],
            "eval": [],
            "eval_fraction": 0.05,
            "max_length": 256,
            "min_chars": 20,
            "strict": False,
        },
        "train": {
            "epochs": 1,
            "batch_size": 8,
            "grad_accum": 1,
            "learning_rate": 5e-4,
            "weight_decay": 0.01,
            "warmup_fraction": 0.05,
            "precision": "auto",
            "gradient_checkpointing": False,
            "schedule": "onecycle",
            "output": "runs/dharma-model",
            "seed": 0,
            "eval_every": 200,
            "eval_tokens": 65536,
            "keep_last": 2,
            "log_every": 10,
            "max_grad_norm": 1.0,
            "optimizer_in_backward": False,
            "optimizer_state": "fp32",
            "max_nonfinite": 5,
            "tensorboard": False,
            "distributed": "ddp",
            "compile": False,
            "compile_mode": "default",
        },
    }
    m = parse_manifest("")
    assert m.train.max_steps is None and m.backbone.tokenizer is None and m.path is None


def test_output_derived_from_model_name_unless_given():
    assert parse_manifest('[model]\nname = "karma-small"\n').train.output == "runs/karma-small"
    m = parse_manifest('[model]\nname = "karma-small"\n[train]\noutput = "out/k"\n')
    assert m.train.output == "out/k"


def test_fresh_backbone_config_gets_default_architecture():
    m = parse_manifest("[backbone]\nconfig = { n_layer = 4, n_embd = 256 }\n")
    assert m.backbone.pretrained is None
    assert m.backbone.config == {"architecture": "gpt2", "n_layer": 4, "n_embd": 256}
    m = parse_manifest(
        '[backbone]\nconfig = { architecture = "llama", hidden_size = 64 }\ntokenizer = "gpt2"\n'
    )
    assert m.backbone.config == {"architecture": "llama", "hidden_size": 64}
    assert m.backbone.tokenizer == "gpt2"


def test_backbone_needs_exactly_one_source():
    both = error_of('[backbone]\npretrained = "distilgpt2"\nconfig = { n_layer = 2 }\n')
    assert both == "m.toml: backbone: set either 'pretrained' or 'config', not both"
    neither = error_of("[backbone]\n")
    assert neither == (
        "m.toml: backbone: set 'pretrained' (a Hugging Face model id or local directory) "
        "or 'config' (a table of model config keys, for fresh weights)"
    )
    assert error_of("[backbone]\nconfig = { architecture = 2 }\n") == (
        "m.toml: backbone.config: 'architecture' must be a string, got 2"
    )


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(DharmaError) as info:
        load_manifest(path)
    assert str(info.value) == f"{path}: no such manifest file"
    with pytest.raises(DharmaError) as info:
        load_manifest(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: is a directory")


def test_malformed_toml_gives_file_line_and_column(tmp_path):
    path = write(tmp_path, '[model]\nname = "x"\nbatch_size = \n')
    with pytest.raises(DharmaError) as info:
        load_manifest(path)
    assert str(info.value) == f"{path}:3:14: invalid TOML: Invalid value"
    assert error_of("[train]\n[train]\n") == "m.toml:2:7: invalid TOML: Cannot declare ('train',) twice"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('requirse = ["x"]\n', "requirse: unknown key; did you mean 'requires'?"),
        ("[modles]\n", "modles: unknown key; did you mean 'modules'?"),
        (
            '[modules]\ncompositon = "routed"\n',
            "modules.compositon: unknown key; did you mean 'composition'?",
        ),
        ("[train]\nbatchsize = 4\n", "train.batchsize: unknown key; did you mean 'batch_size'?"),
        ('[[heads]]\nplugin = "qa"\nconfg = {}\n', "heads[0].confg: unknown key; did you mean 'config'?"),
        (
            "[loss]\nlm_weight = 1.0\n",
            "loss.lm_weight: unknown key; valid keys: lm, concept, router, routing, routing_backbone",
        ),
    ],
)
def test_unknown_key_suggests_closest(text, message):
    assert error_of(text) == f"m.toml: {message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[train]\nbatch_size = "eight"\n', "train.batch_size: expected an integer, got 'eight'"),
        ("[train]\nbatch_size = 8.0\n", "train.batch_size: expected an integer, got 8.0"),
        ('[train]\nlearning_rate = "fast"\n', "train.learning_rate: expected a number, got 'fast'"),
        (
            '[train]\ngradient_checkpointing = "yes"\n',
            "train.gradient_checkpointing: expected true or false, got 'yes'",
        ),
        ("[train]\nepochs = true\n", "train.epochs: expected an integer, got true"),
        ('[data]\ntrain = "corpus.txt"\n', "data.train: expected a list, got 'corpus.txt'"),
        ("[data]\ntrain = [1]\n", "data.train[0]: expected a string, got 1"),
        ("model = 3\n", "model: expected a table, got 3"),
        ('[heads]\nplugin = "qa"\n', "heads: expected an array of tables ([[heads]]), got a table"),
        ("[[heads]]\nconfig = {}\n", "heads[0].plugin: required key is missing"),
        (
            '[modules.override]\n"darshanas.vedanta" = 3\n',
            'modules.override."darshanas.vedanta": expected a table, got 3',
        ),
    ],
)
def test_wrong_types(text, message):
    assert error_of(text) == f"m.toml: {message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[train]\nlearning_rate = 0\n", "train.learning_rate: must be > 0, got 0"),
        ("[train]\nepochs = 0\n", "train.epochs: must be >= 1, got 0"),
        ("[modules]\ntop_k = 0\n", "modules.top_k: must be >= 1, got 0"),
        ("[data]\neval_fraction = 1.0\n", "data.eval_fraction: must be < 1, got 1.0"),
        ("[data]\nmax_length = 4\n", "data.max_length: must be >= 8, got 4"),
        ("[loss]\nconcept = -0.5\n", "loss.concept: must be >= 0, got -0.5"),
        ('[model]\nname = ""\n', "model.name: must not be empty"),
    ],
)
def test_out_of_range(text, message):
    assert error_of(text) == f"m.toml: {message}"


def test_bad_literal_lists_choices_and_suggests():
    assert error_of('[modules]\ncomposition = "routd"\n') == (
        "m.toml: modules.composition: expected one of 'sequential', 'parallel', 'routed', "
        "got 'routd' (did you mean 'routed'?)"
    )
    assert error_of('[train]\nprecision = "half"\n') == (
        "m.toml: train.precision: expected one of 'auto', 'fp32', 'bf16', 'fp16', got 'half'"
    )


def test_every_problem_is_listed_on_its_own_line():
    text = (
        "[modules]\n"
        'compositon = "routed"\n'
        'preset = "big"\n'
        "[train]\n"
        'batch_size = "eight"\n'
        "lr = 1e-4\n"
        "[[heads]]\n"
        'plugn = "qa"\n'
    )
    assert error_of(text).splitlines() == [
        "m.toml: modules.preset: expected one of 'tiny', 'lite', 'seed', got 'big'",
        "m.toml: modules.compositon: unknown key; did you mean 'composition'?",
        "m.toml: heads[0].plugin: required key is missing",
        "m.toml: heads[0].plugn: unknown key; did you mean 'plugin'?",
        "m.toml: train.batch_size: expected an integer, got 'eight'",
        "m.toml: train.lr: unknown key; valid keys: epochs, max_steps, batch_size, grad_accum, "
        "learning_rate, weight_decay, warmup_fraction, precision, gradient_checkpointing, schedule, "
        "output, seed, eval_every, eval_tokens, save_every, keep_last, log_every, max_grad_norm, "
        "optimizer_in_backward, optimizer_state, max_nonfinite, tensorboard, distributed, compile, "
        "compile_mode",
    ]


def test_layers():
    assert error_of('[modules]\ninclude = ["paths"]\n') == (
        "m.toml: modules.at_layers: required when 'include' names modules; list the backbone layers "
        "to insert them at, e.g. at_layers = [2, 4]"
    )
    negative = error_of("[modules]\nat_layers = [1, -2]\n")
    assert negative == "m.toml: modules.at_layers[1]: must be >= 0, got -2"
    assert error_of("[modules]\nat_layers = [3, 1, 3]\n") == (
        "m.toml: modules.at_layers: each layer may appear once; repeated: 3"
    )
    assert parse_manifest("[modules]\nat_layers = [5, 0, 3]\n").modules.at_layers == [0, 3, 5]


def test_requires_must_parse():
    assert error_of('requires = ["pydantic>=2", "dharma plugin"]\n').startswith(
        "m.toml: requires[1]: 'dharma plugin' is not a valid requirement: "
    )


def test_check_requires_reports_missing_and_unsatisfied():
    m = parse_manifest('requires = ["dharma-plugin-does-not-exist>=0.1", "pydantic>=999", "pydantic>=2"]\n')
    with pytest.raises(DharmaError) as info:
        check_requires(m)
    assert str(info.value).splitlines() == [
        "requires: 'dharma-plugin-does-not-exist>=0.1' is not installed; "
        "run: pip install 'dharma-plugin-does-not-exist>=0.1'",
        f"requires: 'pydantic>=999' is not satisfied, pydantic {pydantic.VERSION} is installed; "
        "run: pip install 'pydantic>=999'",
    ]


def test_check_requires_passes_when_satisfied():
    # the last one is for Python 2 only, so its absence does not matter
    m = parse_manifest('requires = ["pydantic>=2", "packaging", "missing-pkg; python_version < \'3\'"]\n')
    assert check_requires(m) is None


class _Vedanta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    bottleneck: int = 64
    mode: Literal["advaita", "dvaita"] = "advaita"


def test_format_validation_error_for_a_plugin_config():
    with pytest.raises(ValidationError) as info:
        _Vedanta(bottlenek=128, mode="advita")
    err = info.value
    prefix = "modules.override.darshanas.vedanta"
    assert format_validation_error(err, model=_Vedanta, prefix=prefix).splitlines() == [
        f"{prefix}.mode: expected one of 'advaita', 'dvaita', got 'advita' (did you mean 'advaita'?)",
        f"{prefix}.bottlenek: unknown key; did you mean 'bottleneck'?",
    ]
    quoted = format_validation_error(
        err, model=_Vedanta, prefix='modules.override."darshanas.vedanta"', source="m.toml"
    )
    assert quoted.splitlines()[1] == (
        "m.toml: modules.override.\"darshanas.vedanta\".bottlenek: unknown key; did you mean 'bottleneck'?"
    )
    # without the model class the problem is still named, only without the suggestion
    assert format_validation_error(err).splitlines()[1] == "bottlenek: unknown key"


class _Tokenizer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: bool = False
    vocab_size: int = 8000


class _Backbone(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokenizer: str | _Tokenizer | None = None


def test_format_validation_error_reports_a_union_once():
    def message(value):
        with pytest.raises(ValidationError) as info:
            _Backbone(tokenizer=value)
        return format_validation_error(info.value, model=_Backbone, prefix="backbone")

    assert message(5) == "backbone.tokenizer: expected a string or a table, got 5"
    assert message({"trian": True}) == "backbone.tokenizer.trian: unknown key; did you mean 'train'?"
    assert message({"vocab_size": "big"}) == "backbone.tokenizer.vocab_size: expected an integer, got 'big'"


def test_closest():
    assert closest("vednta", ["vedanta", "yoga", "samkhya"]) == "vedanta"
    assert closest("crisis.carer", ["crisis.career", "crisis.health"]) == "crisis.career"
    assert closest("xyz", ["vedanta", "yoga"]) is None
    assert closest("a", []) is None


def test_families():
    assert FAMILIES == ("paths", "consciousness", "life", "energy", "crisis", "darshanas")


def test_resolve_path_is_relative_to_the_manifest(tmp_path, monkeypatch):
    sub = tmp_path / "project"
    sub.mkdir()
    m = load_manifest(write(sub, '[data]\ntrain = ["data/corpus.txt"]\n'))
    monkeypatch.chdir(tmp_path)
    assert m.resolve_path(m.data.train[0]) == sub / "data" / "corpus.txt"
    assert m.resolve_path("/abs/x.txt") == Path("/abs/x.txt")
    # a manifest given as text has no file: relative paths mean the working directory
    assert parse_manifest("").resolve_path("data") == tmp_path / "data"
    # the location survives a relative path given to load_manifest
    m = load_manifest(Path("project") / "manifest.toml")
    assert m.resolve_path("data") == sub / "data"


def test_import_does_not_pull_in_torch():
    code = "import sys, dharma_kernel.manifest; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
