"""Usage mistakes and missing paths: one ``error:`` line (and an indented ``hint:``), exit 2, said
before any command imports torch or transformers; help without type noise on every flag."""

from __future__ import annotations

import json

import pytest
from fakedists import run_dharma

from dharma_kernel.testing import run_cli

MISSING = "runs/does-not-exist"

# Every command that reads a path the user names, with that path missing (and the required rest).
READERS = [
    ["validate", "{missing}"],
    ["assemble", "{missing}", "-o", "{tmp}/out"],
    ["plan", "{missing}", "--memory", "4GiB"],
    ["train", "{missing}"],
    ["eval", "{missing}", "--data", "{tmp}"],
    ["generate", "{missing}", "hello"],
    ["explain", "{missing}", "hello"],
    ["chat", "{missing}"],
    ["export", "{missing}", "--format", "onnx", "-o", "{tmp}/m.onnx"],
    ["report", "{missing}"],
    ["finetune", "{missing}", "--data", "{tmp}", "-o", "{tmp}/app"],
    ["predict", "{missing}", "hello"],
    ["translate", "{missing}", "hello"],
    # data paths, with a model path that exists
    ["eval", "{tmp}", "--data", "{missing}"],
    ["train", "{manifest}", "--data", "{missing}"],
    ["finetune", "{tmp}", "--data", "{tmp}", "--eval", "{missing}", "-o", "{tmp}/app"],
    # paths a manifest names
    ["train", "{reads_missing}"],
]


def test_every_command_names_a_missing_path_before_importing_torch(tmp_path):
    manifest = tmp_path / "m.toml"
    manifest.write_text('[model]\nname = "m"\n')
    reads_missing = tmp_path / "reads.toml"
    reads_missing.write_text(f'[model]\nname = "m"\n[data]\ntrain = ["{tmp_path}", "{tmp_path / MISSING}"]\n')
    paths = {
        "missing": tmp_path / MISSING,
        "tmp": tmp_path,
        "manifest": manifest,
        "reads_missing": reads_missing,
    }
    commands = [[arg.format(**paths) for arg in argv] for argv in READERS]
    code = f"""
import json, sys
from dharma_kernel.cli import main
results = []
for argv in {commands!r}:
    try:
        main(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    heavy = [name for name in ("torch", "transformers") if name in sys.modules]
    results.append([code, heavy])
print(json.dumps(results))
"""
    result = run_dharma(None, code=code)

    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout.splitlines()[-1])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(commands), result.stderr
    for argv, (code, heavy), line in zip(commands, outcomes, errors, strict=True):
        assert (code, heavy) == (2, []), argv
        assert line == f"error: {tmp_path / MISSING}: no such file or directory", argv
    assert "Traceback" not in result.stderr


def test_the_hint_says_what_the_argument_should_be(capsys, tmp_path):
    code, stdout, stderr = run_cli(capsys, "generate", tmp_path / "nope", "hello")
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"error: {tmp_path / 'nope'}: no such file or directory\n"
        "  hint: expected a saved model, a run directory (its best checkpoint) or an application.\n"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["trian", "x"], ["error: no such command 'trian'. Did you mean 'train'?", "dharma --help"]),
        (["validate"], ["error: missing argument 'manifest'", "dharma validate --help"]),
        (["validate", "m.toml", "--nope"], ["error: no such option: --nope", "dharma validate --help"]),
        (["plugins", "--kind", "x"], ["error: invalid value for '--kind': ", "dharma plugins --help"]),
    ],
)
def test_usage_mistakes_are_one_error_line_and_a_hint(capsys, argv, expected):
    code, stdout, stderr = run_cli(capsys, *argv)
    assert (code, stdout) == (2, "")
    first, hint = stderr.splitlines()
    assert first.startswith(expected[0]), stderr
    assert hint == f"  hint: {expected[1]} shows the usage"
    assert "╭" not in stderr and "Usage:" not in stderr


def test_a_run_directory_in_the_way_is_an_error_line_and_a_hint(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    manifest = tmp_path / "m.toml"
    manifest.write_text(
        '[model]\nname = "m"\n[backbone]\n'
        'config = { architecture = "gpt2", n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 97 }\n'
        f'[modules]\ninclude = []\n[data]\ntrain = ["{tmp_path}"]\n[train]\noutput = "{run}"\n'
    )
    code, stdout, stderr = run_cli(capsys, "train", manifest)
    assert code == 2
    assert stderr.splitlines() == [
        f"error: {run} already holds a training run (metrics.jsonl)",
        "  hint: Pass --resume to continue it, or --output DIR to start a new run elsewhere (or remove "
        "that directory to start over).",
    ]


def test_help_shows_flags_bare_and_arguments_in_capitals():
    result = run_dharma(None, "validate", "--help", env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    assert "Usage: dharma validate [OPTIONS] MANIFEST" in result.stdout
    assert "<bool>" not in result.stdout and "{manifest}" not in result.stdout
    assert "--freeze" in result.stdout and "--json" in result.stdout


def test_a_missing_foundation_of_a_finetune_manifest_is_named_before_torch(tmp_path):
    manifest = tmp_path / "f.toml"
    manifest.write_text(f'[finetune]\nfrom = "gone"\n[data]\ntrain = ["{tmp_path}"]\n')
    code = f"""
import sys
from dharma_kernel.cli import main
try:
    main(["train", {str(manifest)!r}])
except SystemExit as exit:
    print(exit.code, "torch" in sys.modules)
"""
    result = run_dharma(None, code=code)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr.startswith(
        f"error: [finetune] from: {tmp_path / 'gone'}: no such file or directory\n"
    )
