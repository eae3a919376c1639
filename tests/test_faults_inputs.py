"""Damaged inputs, as a hostile or unlucky user makes them: every command that reads a model,
application or run directory ends with one ``error:`` line naming the file and what is wrong,
exit 2, no traceback; and no pickle is ever unpickled."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from trainkit import SENTENCES, write_corpus, write_manifest

from dharma_kernel.testing import run_cli, tiny_foundation


def refused(result: tuple[int, str, str], *fragments: str) -> str:
    """Assert a clean refusal: exit 2, an ``error:`` line holding every fragment, no traceback."""
    code, _, err = result
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    first = err.splitlines()[0]
    for fragment in fragments:
        assert fragment in first, first
    return first


@pytest.fixture(scope="module")
def foundation(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults")
    return tiny_foundation(folder / "model", SENTENCES * 4, modules=("paths.dharma",))


@pytest.fixture
def model(foundation, tmp_path) -> Path:
    """A copy of the foundation to damage."""
    return Path(shutil.copytree(foundation, tmp_path / "model"))


@pytest.fixture
def text(tmp_path) -> Path:
    return write_corpus(tmp_path / "data", copies=1)


def rewrite_weights(directory: Path, change) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def read_with_every_command(capsys, directory: Path, text: Path):
    """What eval and generate say about ``directory``: both read its weights."""
    yield run_cli(capsys, "eval", directory, "--data", text, "--max-length", 32)
    yield run_cli(capsys, "generate", directory, "Dharma is", "--max-new-tokens", 4)


def test_missing_tensors_are_named_not_filled_with_noise(capsys, model, text):
    doomed = []

    def drop(tensors):
        doomed.extend(sorted(name for name in tensors if name.startswith("backbone."))[:5])
        for name in doomed:
            del tensors[name]

    rewrite_weights(model, drop)
    for result in read_with_every_command(capsys, model, text):
        line = refused(result, f"{model / 'model.safetensors'}", "5 missing", doomed[0], "and 2 more")
        assert doomed[3] not in line  # the first few, not a wall of names


def test_unexpected_tensors_are_named(capsys, model, text):
    rewrite_weights(model, lambda tensors: tensors.update({"stacks.7.stray.weight": torch.zeros(2)}))
    for result in read_with_every_command(capsys, model, text):
        refused(result, "model.safetensors", "1 unexpected (stacks.7.stray.weight)")


@pytest.mark.parametrize("prefix", ["stacks.", "backbone."])
def test_a_tensor_of_the_wrong_shape_is_named(capsys, model, text, prefix):
    chosen = []

    def reshape(tensors):
        chosen.append(next(name for name in sorted(tensors) if name.startswith(prefix)))
        tensors[chosen[0]] = torch.zeros(3, 5)

    rewrite_weights(model, reshape)
    for result in read_with_every_command(capsys, model, text):
        refused(result, "model.safetensors", "wrong shape", f"{chosen[0]} is [3, 5], the model needs")


def test_truncated_weights_are_named(capsys, model, text):
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for result in read_with_every_command(capsys, model, text):
        refused(result, f"{path}: damaged weights file", "truncated")


def test_weights_cut_inside_their_header_are_named(capsys, model, text):
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    refused(run_cli(capsys, "eval", model, "--data", text), f"{path}: damaged weights file", "header claims")


def test_a_header_length_of_two_to_the_forty_is_refused_by_size(capsys, model, text):
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    for result in read_with_every_command(capsys, model, text):
        refused(result, f"{path}: damaged weights file", "1,099,511,627,776 bytes", f"{len(data):,} bytes")


@pytest.mark.parametrize(
    "config",
    ["{", '["a list"]', ""],
    ids=["truncated", "wrong-type", "empty"],
)
def test_an_unreadable_config_is_one_error_line(capsys, model, text, config):
    (model / "config.json").write_text(config)
    for result in read_with_every_command(capsys, model, text):
        refused(result, "config.json")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda config: config.update(text_config=5), "text_config: expected a table, got 5"),
        (lambda config: config["text_config"].pop("model_type"), "text_config.model_type: required key"),
        (lambda config: config.update(layout=[]), "layout: expected a table"),
        (lambda config: config.update(lock="paths.dharma"), "lock: expected"),
        (lambda config: config["lock"][0].pop("ref"), "lock[0].ref: required key is missing"),
    ],
    ids=["text-config-number", "no-backbone-type", "layout-list", "lock-string", "lock-no-ref"],
)
def test_a_damaged_config_names_the_key(capsys, model, text, change, named):
    path = model / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    for result in read_with_every_command(capsys, model, text):
        refused(result, str(path), named)


def test_pickled_weights_are_never_unpickled(capsys, model, text, monkeypatch):
    """A directory holding only a pickle is refused before anything opens it."""
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save(tensors, model / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr("pickle.load", no_unpickling)
    for result in read_with_every_command(capsys, model, text):
        refused(result, "pytorch_model.bin", "safetensors only")


# -- application directories ---------------------------------------------------------------


@pytest.fixture
def application(foundation, tmp_path) -> Path:
    """An application of the foundation whose adapter holds one backbone tensor."""
    from dharma_kernel.application import save_application
    from dharma_kernel.checkpoint import load_saved_tokenizer
    from dharma_kernel.model import DharmaModel

    base = DharmaModel.from_pretrained(foundation)
    trainable = ["backbone.transformer.ln_f.weight"]
    return save_application(base, tmp_path / "app", foundation, trainable, load_saved_tokenizer(foundation))


def edit_application(application: Path, change) -> None:
    path = application / "application.json"
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


def test_an_intact_application_loads(capsys, application, text):
    code, out, err = run_cli(capsys, "eval", application, "--data", text, "--max-length", 32, "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] > 0


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda info: info.pop("foundation_sha256"), "foundation_sha256: required key is missing"),
        (lambda info: info.update(foundation=None), "foundation: expected a string, got None"),
        (lambda info: info.update(foundation_sha256=7), "foundation_sha256: expected a string"),
        (lambda info: info.update(heads="classification"), "heads: expected"),
        (lambda info: info.update(heads=[{"config": {}}]), "heads[0].plugin: required key is missing"),
        (lambda info: info.update(trainable=None), "trainable: expected a list"),
        (lambda info: info.update(format="dharma-application/9"), "not a dharma-application/1 file"),
    ],
    ids=["no-checksum", "null-foundation", "number-checksum", "heads-string", "head-no-plugin",
         "null-trainable", "future-format"],
)  # fmt: skip
def test_a_damaged_application_json_names_the_field(capsys, application, text, change, named):
    edit_application(application, change)
    for result in read_with_every_command(capsys, application, text):
        refused(result, str(application / "application.json"), named)


@pytest.mark.parametrize("content", ["{", "[1, 2]", "\xff\xfe"], ids=["truncated", "a-list", "not-utf8"])
def test_an_unreadable_application_json_is_named(capsys, application, text, content):
    (application / "application.json").write_bytes(content.encode("latin-1"))
    refused(run_cli(capsys, "eval", application, "--data", text), "application.json")


def test_a_truncated_adapter_is_named(capsys, application, text):
    path = application / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    for result in read_with_every_command(capsys, application, text):
        refused(result, f"{path}: damaged weights file")


def test_an_adapter_missing_a_listed_tensor_is_named(capsys, application, text):
    path = application / "adapter.safetensors"
    save_file({"backbone.transformer.ln_f.bias": torch.zeros(64)}, str(path))
    for result in read_with_every_command(capsys, application, text):
        refused(result, str(path), "1 missing (backbone.transformer.ln_f.weight)")


# -- run directories -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished 2-step run of a 64-position model trained at data.max_length 32."""
    from dharma_kernel.cli import main

    folder = tmp_path_factory.mktemp("run")
    manifest = write_manifest(folder, modules=False, train={"max_steps": 2, "eval_every": 2})
    with pytest.raises(SystemExit) as finished:
        main(["train", str(manifest), "--device", "cpu", "--quiet"])
    assert finished.value.code in (0, None)
    return folder


def test_resume_from_a_truncated_latest_is_named(capsys, trained_run, tmp_path):
    folder = Path(shutil.copytree(trained_run, tmp_path / "copy", symlinks=True))
    weights = (folder / "run" / "latest" / "model.safetensors").resolve()
    weights.write_bytes(weights.read_bytes()[:-100])
    result = run_cli(capsys, "train", folder / "m.toml", "--resume", "--max-steps", 4, "--device", "cpu")
    refused(result, f"{weights}: damaged weights file")


# -- past the model's positions --------------------------------------------------------------


def test_eval_defaults_to_the_trained_length(capsys, trained_run):
    """The run trained at 32 tokens; the old default of 256 ran past its 64 positions."""
    command = ["eval", trained_run / "run", "--data", trained_run / "data", "--json"]
    code, default, err = run_cli(capsys, *command)
    assert code == 0, err
    _, explicit, _ = run_cli(capsys, *command, "--max-length", 32)
    assert json.loads(default) == json.loads(explicit)


def test_eval_caps_a_model_without_a_manifest_at_its_positions(capsys, foundation, text):
    code, out, err = run_cli(capsys, "eval", foundation, "--data", text, "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] > 0


def test_eval_refuses_a_length_beyond_the_positions(capsys, foundation, text):
    result = run_cli(capsys, "eval", foundation, "--data", text, "--max-length", 300)
    refused(result, "--max-length 300 is more than the model's 128 positions")


def test_generate_keeps_the_latest_prompt_tokens_that_fit(capsys, foundation):
    """A 300-character prompt on a 128-position model: the start is left out, and said so."""
    prompt = "Karma yoga is work offered without grasping at the fruit. " * 6
    assert len(prompt) > 300
    code, out, err = run_cli(capsys, "generate", foundation, prompt, "--max-new-tokens", 16)
    assert code == 0, err
    assert out.startswith(prompt)
    assert "warning: the prompt is" in err and "hold only its last 112" in err and "Traceback" not in err


def test_generate_with_room_for_the_prompt_says_nothing(capsys, foundation):
    code, out, err = run_cli(capsys, "generate", foundation, "Dharma is", "--max-new-tokens", 100)
    assert code == 0 and out.startswith("Dharma is") and "warning" not in err, err


def test_generate_refuses_more_new_tokens_than_positions(capsys, foundation):
    result = run_cli(capsys, "generate", foundation, "Dharma is", "--max-new-tokens", 128)
    refused(result, "--max-new-tokens 128 leaves no room for the prompt: the model has 128 positions")


# -- data files ------------------------------------------------------------------------------


def malformed_corpus(folder: Path, bad: int) -> Path:
    """write_corpus() with ``bad`` malformed records after its good ones."""
    path = write_corpus(folder, copies=1)
    good = path.read_text()
    path.write_text(good + "".join(f'{{"text": {n}}}\n' for n in range(bad)))
    return path


def test_lenient_eval_lists_the_first_malformed_records_and_the_total(capsys, foundation, tmp_path):
    path = malformed_corpus(tmp_path / "data", bad=8)
    code, out, err = run_cli(capsys, "eval", foundation, "--data", path, "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] > 0
    good = len(SENTENCES)
    assert "skipped 8 (file:record: reason" in err
    assert f"  {path}:{good + 1}: field 'text' should be a string, not int" in err
    assert f"  {path}:{good + 5}: " in err and f"{path}:{good + 6}:" not in err
    assert "and 3 more" in err


def test_lenient_train_lists_the_malformed_records(capsys, tmp_path):
    manifest = write_manifest(tmp_path, modules=False, train={"max_steps": 1, "eval_every": 1})
    path = malformed_corpus(tmp_path / "data", bad=2)
    code, _, err = run_cli(capsys, "train", manifest, "--device", "cpu", "--quiet")
    assert code == 0, err
    assert f"{path}:{len(SENTENCES) + 2}: field 'text' should be a string, not int" in err


def test_strict_eval_stops_at_the_first_malformed_record(capsys, foundation, tmp_path):
    path = malformed_corpus(tmp_path / "data", bad=2)
    result = run_cli(capsys, "eval", foundation, "--data", path, "--strict")
    refused(result, f"{path}:{len(SENTENCES) + 1}: field 'text' should be a string")


DEPTH = 200_000


def test_a_record_nested_200000_deep_is_malformed_not_a_crash(capsys, foundation, tmp_path):
    path = write_corpus(tmp_path / "data", copies=1)
    with path.open("a") as file:
        file.write('{"text": ' + "[" * DEPTH + "]" * DEPTH + "}\n")
    code, out, err = run_cli(capsys, "eval", foundation, "--data", path, "--json")
    assert code == 0 and "Traceback" not in err, err
    assert f"{path}:{len(SENTENCES) + 1}: JSON nested too deeply" in err
    refused(run_cli(capsys, "eval", foundation, "--data", path, "--strict"), "JSON nested too deeply")


def test_a_json_file_nested_200000_deep_is_a_bad_file(tmp_path):
    from dharma_kernel.data import DataReport, read_records
    from dharma_kernel.data.fields import TOO_DEEP

    path = tmp_path / "deep.json"
    path.write_text('[{"text": ' + "[" * DEPTH + "]" * DEPTH + "}]")
    report = DataReport()
    assert read_records([path], report=report) == []
    assert report.problems == [(str(path), 0, TOO_DEEP)]


def test_a_multi_megabyte_single_line_becomes_bounded_records(tmp_path):
    """Memory follows the data: a 4 MB line with no break is read as records of at most a few
    tens of KB, and no word is lost or cut."""
    from dharma_kernel.data import read_records
    from dharma_kernel.data.fields import LINE_BYTES

    words = [f"w{n}" for n in range(600_000)]
    path = tmp_path / "one-line.txt"
    path.write_text(" ".join(words) + "\n")
    assert path.stat().st_size > 4_000_000
    records = read_records([path])
    assert len(records) >= path.stat().st_size // (2 * LINE_BYTES)
    assert max(len(record.text) for record in records) <= 2 * LINE_BYTES  # a piece and a carried word
    assert [w for record in records for w in record.text.split()] == words
    assert [record.index for record in records] == list(range(1, len(records) + 1))


def test_streamed_text_keeps_utf8_across_pieces_and_names_a_bad_byte_far_in(tmp_path):
    from dharma_kernel.data import DataReport, read_records
    from dharma_kernel.data.fields import LINE_BYTES

    verse = "धर्मक्षेत्रे कुरुक्षेत्रे समवेता युयुत्सवः "  # 3-byte characters: pieces end inside them
    path = tmp_path / "gita.txt"
    path.write_bytes(b"\xef\xbb\xbf" + (verse * 2000).encode())
    text = " ".join(record.text for record in read_records([path]))
    assert text.split() == (verse * 2000).split()

    good = ("a" * 100 + "\n") * (3 * LINE_BYTES // 101)
    path.write_bytes(good.encode() + b"caf\xe9\n")
    report = DataReport()
    assert read_records([path], report=report) == []
    assert report.problems == [(str(path), 0, f"not UTF-8 text (byte {len(good) + 3} is 0xe9)")]


# -- flags and output ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_an_unknown_device_is_one_error_line(capsys, foundation, tmp_path, command):
    if command == "train":
        args = [write_manifest(tmp_path, modules=False)]
    else:
        args = [foundation, "--data", write_corpus(tmp_path / "data"), "-o", tmp_path / "app"]
    refused(run_cli(capsys, command, *args, "--device", "banana"), "--device banana: not a device")


def test_eval_json_writes_null_for_a_nan_loss(capsys, model, text):
    rewrite_weights(model, lambda tensors: tensors["backbone.transformer.ln_f.weight"].fill_(float("nan")))
    code, out, err = run_cli(capsys, "eval", model, "--data", text, "--json")
    assert code == 0, err

    def no_bare_constants(name):
        raise AssertionError(f"invalid JSON: bare {name}")

    result = json.loads(out, parse_constant=no_bare_constants)
    assert result["loss"] is None and result["perplexity"] is None and result["tokens"] > 0


@pytest.mark.parametrize(
    ("env", "flag", "how"),
    [
        ("darshanas.vedanta", [], "not in DHARMA_PLUGINS=darshanas.vedanta; to enable it, add paths.dharma"),
        (None, ["--no-plugin", "dharma-plugin-dharma"], "enable it, drop --no-plugin dharma-plugin-dharma"),
    ],
    ids=["allowlist", "no-plugin"],
)
def test_a_disabled_plugin_is_called_disabled_not_missing(capsys, foundation, monkeypatch, env, flag, how):
    from dharma_kernel import registry

    if env is not None:
        monkeypatch.setenv("DHARMA_PLUGINS", env)
    registry.clear_cache()
    try:
        result = run_cli(capsys, *flag, "generate", foundation, "Dharma is")
    finally:
        registry.clear_cache()
    refused(result, "cannot load this model")
    err = result[2]
    assert "not installed" not in err and "paths.dharma is installed but" in err and how in err, err
