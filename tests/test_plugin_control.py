"""What loads: DHARMA_PLUGINS, --no-plugin, DHARMA_TRACE_PLUGINS, and plugins that misbehave at import.

Each test installs fake distributions into a temporary site directory and runs ``dharma`` in a
subprocess, as a user does; only the fake plugins' rows are looked at (the development venv
has the real ones installed as well).
"""

from __future__ import annotations

import json
import re
import time

import pytest
from fakedists import install, run_dharma

from dharma_kernel import registry
from dharma_kernel.errors import DharmaError

TARKA = """
import torch

from dharma_kernel.protocol import DharmaModule, ModuleOutput


class Tarka(DharmaModule):
    family = "darshanas"
    name = "tarka"
    module_api = "1.0"
    concepts = ("तर्क", "tarka", "reasoning")

    def __init__(self, hidden_size, config=None):
        super().__init__(hidden_size, config)
        self.scale = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden, ctx):
        return ModuleOutput(hidden * (1 + self.scale), torch.zeros(hidden.shape[:2]))
"""

# --check imports only these: the development venv's 40 real plugins would take most of the time
ONLY_FAKES = {
    "DHARMA_PLUGINS": ",".join(
        f"dharma-fake-{n}" for n in ("tarka", "raising", "hanging", "printing", "nowhere")
    )
}
TINY = 'config = { architecture = "gpt2", n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 97 }'


def module(site, dist, ref, module_name, source, *, value=None):
    entries = {"dharma.modules": {ref: value or f"{module_name}:Plugin"}, "dharma.api": {ref: "1.0"}}
    install(site, dist, entries, {module_name: source} if source is not None else None)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """tarka works; raising, hanging, printing and nowhere misbehave at import; a hook prints."""
    site = tmp_path_factory.mktemp("site")
    module(
        site,
        "dharma-fake-tarka",
        "darshanas.tarka",
        "dharma_fake_tarka",
        TARKA,
        value="dharma_fake_tarka:Tarka",
    )
    module(site, "dharma-fake-raising", "paths.raising", "dharma_fake_raising",
           "raise RuntimeError('raising needs a GPU')\n")  # fmt: skip
    module(site, "dharma-fake-hanging", "paths.hanging", "dharma_fake_hanging",
           "import time\ntime.sleep(600)\n")  # fmt: skip
    printing = (
        TARKA.replace("Tarka", "Printing").replace('"darshanas"', '"life"').replace('"tarka"', '"printing"')
    )
    module(site, "dharma-fake-printing", "life.printing", "dharma_fake_printing",
           "print('hello from printing')\n" + printing, value="dharma_fake_printing:Printing")  # fmt: skip
    module(site, "dharma-fake-nowhere", "energy.nowhere", "dharma_fake_nowhere", None)
    install(site, "dharma-fake-loudhooks", {"dharma.hooks": {"loud": "dharma_fake_loudhooks"}},
            {"dharma_fake_loudhooks": "print('hello from a hook plugin')\n"})  # fmt: skip
    return site


def manifest(path, include='"darshanas.tarka"'):
    path.write_text(
        f'[model]\nname = "t"\n[backbone]\n{TINY}\n'
        f'[modules]\npreset = "tiny"\ninclude = [{include}]\nat_layers = [0, 1]\n'
    )
    return path


def fake_rows(stdout):
    return {row["ref"]: row for row in json.loads(stdout) if row["distribution"].startswith("dharma-fake-")}


def test_misbehaving_plugins_never_break_listing_help_or_an_unrelated_manifest(site, tmp_path):
    listed = run_dharma(site, "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = fake_rows(listed.stdout)  # stdout is JSON alone: the hook's print went to stderr
    assert sorted(rows) == [
        "darshanas.tarka",
        "energy.nowhere",
        "life.printing",
        "paths.hanging",
        "paths.raising",
    ]
    assert {row["status"] for row in rows.values()} == {"ok"}  # metadata only: nothing imported
    assert "hello from a hook plugin" in listed.stderr

    helped = run_dharma(site, "--help")
    assert helped.returncode == 0 and "plugins" in helped.stdout and "Traceback" not in helped.stderr

    validated = run_dharma(site, "validate", str(manifest(tmp_path / "m.toml")))
    assert validated.returncode == 0, validated.stderr
    assert "ok (no weights allocated)" in validated.stdout


def test_check_reports_each_misbehaving_plugin_with_its_reason(site):
    start = time.perf_counter()
    result = run_dharma(
        site, "plugins", "--check", "--json", env={"DHARMA_IMPORT_TIMEOUT": "2", **ONLY_FAKES}
    )
    elapsed = time.perf_counter() - start

    assert result.returncode == 0, result.stderr
    rows = fake_rows(result.stdout)
    assert {ref: (row["status"], row["error"]) for ref, row in rows.items()} == {
        "darshanas.tarka": ("ok", None),
        "life.printing": ("ok", None),
        "paths.raising": ("broken", "importing dharma_fake_raising raised RuntimeError: raising needs a GPU"),
        "paths.hanging": (
            "broken",
            "import did not finish within 2 s (set DHARMA_IMPORT_TIMEOUT to wait longer)",
        ),
        "energy.nowhere": (
            "broken",
            "its entry point names dharma_fake_nowhere:Plugin, "
            "but no module dharma_fake_nowhere is installed",
        ),
    }
    assert "hello from printing" in result.stderr
    assert elapsed < 60, f"the hanging import was not abandoned: {elapsed:.1f} s"

    table = run_dharma(site, "plugins", "--check", env={"DHARMA_IMPORT_TIMEOUT": "1", **ONLY_FAKES})
    assert table.returncode == 0, table.stderr
    line = next(
        line.strip() for line in table.stdout.splitlines() if line.strip().startswith("paths.hanging")
    )
    assert line.endswith(
        "broken: import did not finish within 1 s (set DHARMA_IMPORT_TIMEOUT to wait longer)"
    )


def test_a_hook_plugin_that_hangs_delays_commands_by_the_timeout_only(tmp_path):
    install(tmp_path, "dharma-fake-slowhooks", {"dharma.hooks": {"slow": "dharma_fake_slowhooks"}},
            {"dharma_fake_slowhooks": "import time\ntime.sleep(600)\n"})  # fmt: skip

    result = run_dharma(tmp_path, "plugins", "--json", env={"DHARMA_IMPORT_TIMEOUT": "1"})

    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)
    assert "hook plugin 'slow' from dharma-fake-slowhooks is broken: import did not finish within 1 s" in (
        result.stderr
    )


def test_allowlist_keeps_every_other_plugin_from_loading(site):
    env = {"DHARMA_PLUGINS": "darshanas.tarka, dharma-fake-raising"}  # a ref and a distribution
    rows = fake_rows(run_dharma(site, "plugins", "--json", env=env).stdout)

    assert rows["darshanas.tarka"]["status"] == rows["paths.raising"]["status"] == "ok"
    assert (rows["life.printing"]["status"], rows["life.printing"]["error"]) == (
        "disabled",
        "not in DHARMA_PLUGINS=darshanas.tarka, dharma-fake-raising",
    )
    listed = json.loads(run_dharma(site, "plugins", "--json", env=env).stdout)
    assert {row["ref"] for row in listed if row["status"] != "disabled"} == {
        "darshanas.tarka",
        "paths.raising",
    }

    # Set but empty: nothing loads, hook plugins included.
    empty = run_dharma(site, "plugins", "--json", env={"DHARMA_PLUGINS": ""})
    assert {row["status"] for row in json.loads(empty.stdout)} == {"disabled"}
    assert "hello from a hook plugin" not in empty.stderr


def test_no_plugin_works_before_and_after_the_command_and_names_itself_in_errors(site, tmp_path):
    after = fake_rows(run_dharma(site, "plugins", "--json", "--no-plugin", "tarka").stdout)
    before = fake_rows(run_dharma(site, "--no-plugin=dharma-fake-tarka", "plugins", "--json").stdout)
    assert after["darshanas.tarka"]["error"] == "disabled by --no-plugin tarka"
    assert before["darshanas.tarka"]["error"] == "disabled by --no-plugin dharma-fake-tarka"
    assert after["paths.raising"]["status"] == before["paths.raising"]["status"] == "ok"

    table = run_dharma(site, "plugins", "--no-plugin", "tarka").stdout
    assert re.search(r"^ *darshanas\.tarka .* disabled: disabled by --no-plugin tarka *$", table, re.M)

    result = run_dharma(
        site, "validate", str(manifest(tmp_path / "m.toml")), "--no-plugin", "darshanas.tarka"
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-3:] == [
        "error: modules.include needs 1 module(s) that are disabled:",
        "  darshanas.tarka: disabled by --no-plugin darshanas.tarka",
        "  hint: Allow them, or drop them with modules.exclude, or list only the modules you have.",
    ]


def test_a_family_leaves_a_disabled_third_party_member_out(site, tmp_path):
    # printing's import prints to stdout: whether it was imported shows on the output
    family = run_dharma(
        site, "validate", str(manifest(tmp_path / "f.toml", '"life"')), "--no-plugin", "printing"
    )
    assert family.returncode == 0, family.stderr
    assert "hello from printing" not in family.stdout and "5 at layers [0, 1]" in family.stdout
    with_it = run_dharma(site, "validate", str(manifest(tmp_path / "f.toml", '"life"')))
    assert "hello from printing" in with_it.stdout and "6 at layers [0, 1]" in with_it.stdout


def test_trace_says_what_loaded_from_where_and_how_long_it_took(site, tmp_path):
    result = run_dharma(
        site, "validate", str(manifest(tmp_path / "m.toml")), env={"DHARMA_TRACE_PLUGINS": "1"}
    )

    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dharma trace: ")]
    loaded = [line for line in lines if "loaded module darshanas.tarka" in line]
    assert len(loaded) == 1, lines
    where = re.escape(str(site / "dharma_fake_tarka.py"))
    assert re.fullmatch(
        rf"dharma trace: loaded module darshanas\.tarka from dharma-fake-tarka 0\.1 at {where} in \d+\.\d ms",
        loaded[0],
    )
    assert any(
        re.fullmatch(r"dharma trace: loaded hooks loud from dharma-fake-loudhooks .* ms", x) for x in lines
    )
    assert not [line for line in lines if "hanging" in line or "raising" in line]  # never imported

    quiet = run_dharma(site, "plugins", "--json", env={"DHARMA_TRACE_PLUGINS": None})
    assert "dharma trace:" not in quiet.stderr


def test_resolving_a_disabled_plugin_says_how_to_allow_it(tmp_path, monkeypatch):
    module(
        tmp_path,
        "dharma-fake-tarka",
        "darshanas.tarka",
        "dharma_fake_tarka",
        TARKA,
        value="dharma_fake_tarka:Tarka",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DHARMA_PLUGINS", "darshanas.vedanta")
    registry.clear_cache()
    try:
        with pytest.raises(
            DharmaError, match=r"'darshanas.tarka' from dharma-fake-tarka is installed but not in "
        ):
            registry.resolve("tarka")
        monkeypatch.setenv("DHARMA_PLUGINS", "tarka")
        assert registry.resolve("tarka").distribution == "dharma-fake-tarka"
    finally:
        registry.clear_cache()


def test_no_plugin_is_taken_from_anywhere_before_a_double_dash_and_lasts_one_command_line():
    from dharma_kernel.cli import _take_no_plugin

    try:
        assert _take_no_plugin(["--no-plugin", "a", "plugins", "--no-plugin=b", "--json"]) == [
            "plugins",
            "--json",
        ]
        assert registry._disabled_by_flag == {"a", "b"}
        assert _take_no_plugin(["generate", "m", "--", "--no-plugin", "c"]) == [
            "generate", "m", "--", "--no-plugin", "c",
        ]  # fmt: skip
        assert registry._disabled_by_flag == set()
        with pytest.raises(DharmaError, match="--no-plugin needs a plugin ref, short name or distribution"):
            _take_no_plugin(["plugins", "--no-plugin"])
    finally:
        registry.disable([], reset=True)
