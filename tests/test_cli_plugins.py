"""``dharma plugins``, ``--version`` and error handling, run as a user runs them: in a subprocess."""

from __future__ import annotations

import json

import pytest
from fakedists import install, run_dharma
from typer.testing import CliRunner

from dharma_kernel import cli, registry
from dharma_kernel.version import MODULE_API, __version__

TARKA = """
import torch

from dharma_kernel.protocol import DharmaModule, ModuleOutput


class Tarka(DharmaModule):
    family = "darshanas"
    name = "tarka"
    module_api = "1.0"

    def forward(self, hidden, ctx):
        return ModuleOutput(hidden, torch.zeros(hidden.shape[:2]))
"""

GLOSS = """
from dharma_kernel.protocol import HeadModule, HeadOutput


class Gloss(HeadModule):
    name = "gloss"
    module_api = "1.0"
"""

HOOKS = """
from dharma_kernel.errors import DharmaError
from dharma_kernel.hookspecs import hookimpl


@hookimpl
def dharma_cli_commands(app):
    @app.command()
    def boom():
        raise DharmaError("manifest.toml: [modules] include: unknown module 'tarkka'")

    @app.command()
    def interrupt():
        raise KeyboardInterrupt
"""

KEYS = {"ref", "name", "kind", "family", "distribution", "version", "module_api", "status", "error"}
TANTRA_REASON = "importing dharma_fake_tantra raised RuntimeError: tantra needs a GPU"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A valid module, a module that fails at import, a head and a hook plugin adding two commands."""
    site = tmp_path_factory.mktemp("site")
    install(site, "dharma-fake-tarka", {"dharma.modules": {"darshanas.tarka": "dharma_fake_tarka:Tarka"},
                                        "dharma.api": {"darshanas.tarka": "1.0"}},
            {"dharma_fake_tarka": TARKA})  # fmt: skip
    install(site, "dharma-fake-tantra", {"dharma.modules": {"paths.tantra": "dharma_fake_tantra:Tantra"},
                                         "dharma.api": {"paths.tantra": "1.0"}},
            {"dharma_fake_tantra": "raise RuntimeError('tantra needs a GPU')\n"})  # fmt: skip
    install(site, "dharma-fake-gloss", {"dharma.heads": {"gloss": "dharma_fake_gloss:Gloss"},
                                        "dharma.api": {"gloss": "1.0"}},
            {"dharma_fake_gloss": GLOSS})  # fmt: skip
    install(site, "dharma-fake-hooks", {"dharma.hooks": {"fake": "dharma_fake_hooks"}},
            {"dharma_fake_hooks": HOOKS})  # fmt: skip
    return site


def run(site, *args, code=None):
    return run_dharma(site, *args, code=code)


def rows(stdout):
    """Table rows by ref, each split into its cells."""
    return {line.split()[0]: line.strip().split(maxsplit=5) for line in stdout.splitlines() if line.strip()}


def test_table_lists_plugins_from_metadata(site):
    result = run(site, "plugins")

    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert table["darshanas.tarka"] == "darshanas.tarka dharma-fake-tarka 0.1 darshanas 1.0 ok".split()
    assert table["gloss"] == "gloss dharma-fake-gloss 0.1 - 1.0 ok".split()
    assert table["paths.tantra"][-1] == "ok"  # metadata is fine; only --check imports it
    assert table["ref"] == "ref distribution version family MODULE_API status".split()


def test_json_has_the_documented_keys(site):
    result = run(site, "plugins", "--json", "--kind", "module")

    assert result.returncode == 0, result.stderr
    listed = {row["ref"]: row for row in json.loads(result.stdout)}
    assert all(set(row) == KEYS for row in listed.values())
    assert "gloss" not in listed
    assert listed["darshanas.tarka"] == {
        "ref": "darshanas.tarka",
        "name": "tarka",
        "kind": "module",
        "family": "darshanas",
        "distribution": "dharma-fake-tarka",
        "version": "0.1",
        "module_api": "1.0",
        "status": "ok",
        "error": None,
    }


def test_check_reports_the_plugin_that_fails_to_import_and_keeps_the_others(site):
    listed = {row["ref"]: row for row in json.loads(run(site, "plugins", "--check", "--json").stdout)}
    assert (listed["paths.tantra"]["status"], listed["paths.tantra"]["error"]) == ("broken", TANTRA_REASON)
    assert (listed["darshanas.tarka"]["status"], listed["darshanas.tarka"]["error"]) == ("ok", None)
    assert (listed["gloss"]["status"], listed["gloss"]["error"]) == ("ok", None)

    result = run(site, "plugins", "--check")
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert table["paths.tantra"][-1] == f"broken: {TANTRA_REASON}"
    assert table["darshanas.tarka"][-1] == "ok"


def test_version(site):
    result = run(site, "--version")

    assert result.returncode == 0
    assert result.stdout == f"dharma-kernel {__version__}, MODULE_API {MODULE_API}\n"


def test_dharma_error_exits_2_with_message_and_no_traceback(site):
    result = run(site, "boom")

    assert result.returncode == 2
    assert result.stderr == "error: manifest.toml: [modules] include: unknown module 'tarkka'\n"


def test_keyboard_interrupt_exits_130_quietly(site):
    result = run(site, "interrupt")

    assert result.returncode == 130
    assert "Traceback" not in result.stderr


def test_broken_hook_plugins_are_reported_and_not_fatal(tmp_path):
    hook = "from dharma_kernel.hookspecs import hookimpl\n\n@hookimpl\ndef {name}(app):\n    {body}\n"
    misspelt = hook.format(name="dharma_cli_command", body="pass")
    raising = hook.format(name="dharma_cli_commands", body="1 / 0")
    install(tmp_path, "dharma-fake-hooks-a", {"dharma.hooks": {"imports": "dharma_fake_hooks_a"}},
            {"dharma_fake_hooks_a": "raise ImportError('needs pandas')\n"})  # fmt: skip
    install(tmp_path, "dharma-fake-hooks-b", {"dharma.hooks": {"misspelt": "dharma_fake_hooks_b"}},
            {"dharma_fake_hooks_b": misspelt})  # fmt: skip
    install(tmp_path, "dharma-fake-hooks-c", {"dharma.hooks": {"raising": "dharma_fake_hooks_c"}},
            {"dharma_fake_hooks_c": raising})  # fmt: skip

    result = run(tmp_path, "plugins", "--json")

    assert result.returncode == 0
    assert isinstance(json.loads(result.stdout), list)
    warnings = sorted(result.stderr.splitlines())
    assert warnings == [
        "warning: hook plugin 'imports' from dharma-fake-hooks-a is broken: ImportError: needs pandas; "
        "reinstall or upgrade dharma-fake-hooks-a",
        "warning: hook plugin 'misspelt' from dharma-fake-hooks-b is broken: implements unknown hook "
        "dharma_cli_command; the hooks are in dharma_kernel.hookspecs; "
        "reinstall or upgrade dharma-fake-hooks-b",
        "warning: hook plugin 'raising' from dharma-fake-hooks-c is broken: dharma_cli_commands raised "
        "ZeroDivisionError: division by zero; reinstall or upgrade dharma-fake-hooks-c",
    ]


def test_listing_and_help_import_neither_torch_nor_plugins(site):
    code = """
import json, sys
from dharma_kernel.cli import main
codes = []
for argv in (["plugins"], ["plugins", "--json"], ["--help"]):
    try:
        main(argv)
    except SystemExit as exit:
        codes.append(exit.code)
heavy = ("torch", "transformers", "dharma_kernel.protocol", "dharma_fake_tarka", "dharma_fake_tantra")
print(json.dumps({"codes": codes, "imported": [name for name in heavy if name in sys.modules]}))
"""
    result = run(site, code=code)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"codes": [0, 0, 0], "imported": []}


def test_empty_listing_says_how_to_install_one(monkeypatch):
    monkeypatch.setattr(registry, "discover", lambda kind=None, disabled=False: [])
    runner = CliRunner()

    result = runner.invoke(cli.app, ["plugins"])
    assert (result.exit_code, result.output) == (
        0,
        "No plugins are installed. Install one with: pip install dharma-plugin-vedanta\n",
    )
    result = runner.invoke(cli.app, ["plugins", "--kind", "head"])
    assert result.output == "No head plugins are installed. Install one with: pip install dharma-head-qa\n"
    assert json.loads(runner.invoke(cli.app, ["plugins", "--json"]).output) == []


def test_the_count_line_agrees_in_number(monkeypatch):
    one = registry.PluginInfo("head", "qa", None, "qa", "dharma_head_qa:QA", "dharma-head-qa", "0.1.0", "1.0")
    runner = CliRunner()

    monkeypatch.setattr(registry, "discover", lambda kind=None, disabled=False: [one])
    assert runner.invoke(cli.app, ["plugins"]).output.splitlines()[-1] == (
        "1 plugin, 0 broken (metadata only; --check imports each)"
    )
    monkeypatch.setattr(registry, "discover", lambda kind=None, disabled=False: [one, one])
    assert runner.invoke(cli.app, ["plugins"]).output.splitlines()[-1].startswith("2 plugins, 0 broken")
