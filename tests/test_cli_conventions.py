"""CLI conventions: --json and --quiet on every command that prints a table, NO_COLOR, logging."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from rich.console import Console
from rich.logging import RichHandler
from trainkit import write_manifest

from dharma_kernel import cli
from dharma_kernel.cli import options as shared
from dharma_kernel.logs import set_level, setup_logging
from dharma_kernel.testing import run_cli as dharma

# Commands whose normal output is a table (or a block of facts a script would want as data).
TABLE_COMMANDS = {"plugins", "validate", "assemble", "plan", "train", "eval", "report"}


def options() -> dict[str, dict[str, object]]:
    group = typer.main.get_command(cli.app)
    return {
        name: {opt: param for param in command.params for opt in getattr(param, "opts", [])}
        for name, command in group.commands.items()
    }


# Commands printing results a script may want; tested structurally (running them needs an application).
OTHER_RESULT_COMMANDS = {"finetune", "predict", "translate", "export"}


def test_every_table_command_takes_the_shared_json_and_quiet_options():
    found = options()
    assert TABLE_COMMANDS | OTHER_RESULT_COMMANDS <= set(found)
    for name, opts in found.items():
        if name in TABLE_COMMANDS | OTHER_RESULT_COMMANDS or "--json" in opts or "--quiet" in opts:
            assert "--json" in opts and "--quiet" in opts and "-q" in opts, name
            # the shared options, whose callbacks keep stdout for the JSON and silence it for --quiet
            assert getattr(opts["--json"].callback, "__wrapped__", None) is shared._json, name
            assert getattr(opts["--quiet"].callback, "__wrapped__", None) is shared._quiet, name


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from dharma_kernel.train.run import TrainOptions, train

    folder = tmp_path_factory.mktemp("conventions")
    manifest = write_manifest(folder, train={"max_steps": 4, "eval_every": 4})
    train(manifest, TrainOptions(), Console(file=io.StringIO()))
    return folder


def commands(folder: Path, tmp_path: Path) -> dict[str, list[object]]:
    manifest = folder / "m.toml"
    return {
        "plugins": ["plugins"],
        "validate": ["validate", manifest],
        "assemble": ["assemble", manifest, "-o", tmp_path / "assembled"],
        "plan": ["plan", manifest, "--memory", "1GiB"],
        "train": ["train", manifest, "-o", tmp_path / "trained", "--max-steps", "2"],
        "eval": ["eval", folder / "run", "--data", folder / "data", "--max-length", "32"],
        "report": ["report", folder / "run", "-o", tmp_path / "report"],
    }


@pytest.mark.parametrize("name", sorted(TABLE_COMMANDS))
def test_json_is_all_that_reaches_stdout(run, tmp_path, capsys, name):
    code, stdout, stderr = dharma(capsys, *commands(run, tmp_path)[name], "--json")
    assert code == 0, stderr
    json.loads(stdout)  # nothing else on stdout: no table, no progress, no summary line


@pytest.mark.parametrize("name", sorted(TABLE_COMMANDS))
def test_quiet_prints_nothing_on_stdout_and_still_does_the_work(run, tmp_path, capsys, name):
    code, stdout, stderr = dharma(capsys, *commands(run, tmp_path)[name], "--quiet")
    assert code == 0, stderr
    assert stdout == ""
    made = {"assemble": "assembled/config.json", "train": "trained/latest", "report": "report/report.html"}
    if name in made:
        assert (tmp_path / made[name]).exists()


def test_each_command_starts_loud_again(run, tmp_path, capsys):
    assert dharma(capsys, "plugins", "-q")[1] == ""
    assert logging.getLogger("dharma_kernel").level == logging.WARNING
    code, stdout, _ = dharma(capsys, "plugins")
    assert code == 0 and "plugins," in stdout
    assert logging.getLogger("dharma_kernel").level == logging.INFO


def test_log_records_print_as_cli_lines_through_rich():
    buffer = io.StringIO()
    logger = setup_logging(Console(file=buffer, width=40, soft_wrap=True, color_system=None))  # as main()
    assert sum(isinstance(h, RichHandler) for h in logger.handlers) == 1  # (pytest adds its own too)
    log = logging.getLogger("dharma_kernel.train.session")
    long = "a path that is longer than the forty columns of this console"
    log.info("step 1/2  loss 5.0")
    log.warning(long)
    set_level(logging.WARNING)  # what --quiet does
    log.info("step 2/2  loss 4.0")
    log.error("stopped")
    assert buffer.getvalue() == f"step 1/2  loss 5.0\nwarning: {long}\nerror: stopped\n"
    setup_logging()  # a second call replaces the handler rather than adding one
    assert sum(isinstance(h, RichHandler) for h in logging.getLogger("dharma_kernel").handlers) == 1


def plain_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM", "COLUMNS")}
    return {**env, "FORCE_COLOR": "1", "COLUMNS": "200", **extra}  # a terminal, as far as rich can tell


@pytest.mark.parametrize("argv", [["plugins"], ["validate", "missing.toml"]])
def test_no_color_means_no_escape_codes_even_on_a_terminal(tmp_path, argv):
    command = [sys.executable, "-m", "dharma_kernel", *argv]
    coloured = subprocess.run(command, capture_output=True, text=True, env=plain_env(), cwd=tmp_path)
    assert "\x1b[" in coloured.stdout + coloured.stderr  # the check below can fail
    plain = subprocess.run(command, capture_output=True, text=True, env=plain_env(NO_COLOR="1"), cwd=tmp_path)
    assert plain.returncode == coloured.returncode
    assert "\x1b" not in plain.stdout + plain.stderr
    assert (plain.stdout + plain.stderr).strip()


def test_python_warnings_print_as_one_warning_line(capsys):
    import warnings

    @cli.app.command("zz-warns")
    def warns() -> None:
        warnings.warn("the old flag is going away", FutureWarning, stacklevel=1)
        warnings.warn("a plugin said so", stacklevel=1)
        cli.out.print("done")

    try:
        code, stdout, stderr = dharma(capsys, "zz-warns")
    finally:
        cli.app.registered_commands.pop()
    assert code == 0 and stdout == "done\n"
    assert stderr == "warning: FutureWarning: the old flag is going away\nwarning: a plugin said so\n"
    assert warnings.showwarning.__module__ != "dharma_kernel.cli"  # Python's display is back
