"""``dharma new-plugin``: names are checked, and what it writes installs, passes its tests and is listed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from fakedists import install, run_dharma
from packaging.requirements import Requirement
from venvkit import (
    OFFLINE,
    ROOT,
    check,
    dharma,
    dharma_distributions,
    load_saved,
    make_venv,
    pip,
    plugin_rows,
    run,
    shared_deps,
    tiny_manifest,
)

from dharma_kernel import registry
from dharma_kernel.cli.new_plugin import plan_plugin
from dharma_kernel.errors import DharmaError
from dharma_kernel.plugin_template import kernel_requirement
from dharma_kernel.version import MODULE_API, __version__


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("Bad-Name",),
            "plugin name 'Bad-Name' is not a lower-case identifier .*\ntry: dharma new-plugin bad_name",
        ),
        (
            ("9lives",),
            "plugin name '9lives' is not a lower-case identifier .*\ntry: dharma new-plugin x_9lives",
        ),
        (
            ("my__name",),
            "plugin name 'my__name' is not a lower-case identifier .*\ntry: dharma new-plugin my_name",
        ),
        (("yoga",), "module name 'yoga' is taken by darshanas.yoga and paths.yoga\n.*--family consciousness"),
        (("karma", "module", "paths"), "module 'paths.karma' is already installed or standard"),
        (("tarka", "module", "darshana"), "unknown family 'darshana'; did you mean 'darshanas'\\?"),
        (("qa", "head"), "a head named 'qa' is already installed or standard"),
        (("gloss", "head", "paths"), "--family is for modules; a head's ref is its name alone"),
    ],
)
def test_bad_or_taken_names_are_refused_with_what_to_do(args, message):
    with pytest.raises(DharmaError) as caught:
        plan_plugin(*args)
    assert re.match(message, str(caught.value), re.S), str(caught.value)


def test_family_disambiguates_a_taken_name_and_the_distribution_says_which():
    yoga = plan_plugin("yoga", "module", "energy")
    assert (yoga.ref, yoga.distribution, yoga.package, yoga.class_name) == (
        "energy.yoga", "dharma-plugin-yoga-energy", "dharma_plugin_yoga_energy", "Yoga",
    )  # fmt: skip
    fresh = plan_plugin("nyaya_sutra")
    assert (fresh.ref, fresh.distribution, fresh.package, fresh.class_name) == (
        "paths.nyaya_sutra", "dharma-plugin-nyaya-sutra", "dharma_plugin_nyaya_sutra", "NyayaSutra",
    )  # fmt: skip
    head = plan_plugin("gloss", "head")
    assert (head.ref, head.distribution, head.package) == ("gloss", "dharma-head-gloss", "dharma_head_gloss")


def test_an_installed_third_party_ref_is_taken_too(tmp_path, monkeypatch):
    install(tmp_path, "dharma-fake-tarka", {"dharma.modules": {"darshanas.tarka": "dharma_fake_tarka:Tarka"},
                                            "dharma.api": {"darshanas.tarka": "1.0"}})  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.clear_cache()
    try:
        with pytest.raises(DharmaError, match="module name 'tarka' is taken by darshanas.tarka"):
            plan_plugin("tarka")
        assert plan_plugin("tarka", "module", "life").distribution == "dharma-plugin-tarka-life"
    finally:
        registry.clear_cache()


def test_kernel_requirement_admits_this_kernel_and_stops_at_the_next_breaking_release():
    assert kernel_requirement("0.1.0") == "dharma-kernel>=0.1,<0.2"
    assert kernel_requirement("1.4.2") == "dharma-kernel>=1.4,<2"
    assert Requirement(kernel_requirement()).specifier.contains(__version__)


def test_cli_writes_the_distribution_and_refuses_a_directory_that_is_not_empty(tmp_path):
    target = tmp_path / "tarka"
    result = run_dharma(None, "new-plugin", "tarka", "--family", "darshanas", "-o", str(target))

    assert result.returncode == 0, result.stderr
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["README.md", "dharma_plugin_tarka/__init__.py", "pyproject.toml", "tests/test_tarka.py"]
    assert (
        result.stdout.splitlines()[0] == f"wrote module darshanas.tarka as dharma-plugin-tarka in {target}:"
    )
    assert (
        result.stdout.splitlines()[-1]
        == f"next: pip install -e {target} && pytest {target} && dharma plugins --check"
    )
    project = tomllib.loads((target / "pyproject.toml").read_text())
    assert project["project"]["name"] == "dharma-plugin-tarka"
    assert project["project"]["dependencies"] == [kernel_requirement()]
    entry_points = project["project"]["entry-points"]
    assert entry_points["dharma.modules"] == {"darshanas.tarka": "dharma_plugin_tarka:Tarka"}
    assert entry_points["dharma.api"] == {"darshanas.tarka": MODULE_API}

    again = run_dharma(None, "new-plugin", "tarka", "--family", "darshanas", "-o", str(target))
    assert again.returncode == 2
    assert again.stderr.startswith(f"error: {target} exists and is not empty; refusing to write into it\n")
    assert (target / "README.md").read_text() == (target / "README.md").read_text()  # untouched


def readme_plugin_blocks() -> list[list[str]]:
    """The command blocks of README's "Writing a plugin", each a list of its command lines."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Writing a plugin\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```\n(.*?)^```$", section, re.S | re.M)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def test_readme_walkthrough_starts_from_make_dist_and_a_fresh_venv():
    """What the walkthrough's prose asks for before its blocks; the slow test below does both."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Writing a plugin\n", 1)[1].split("\n## ", 1)[0]
    prose = " ".join(section.split())
    assert "in the repository root, `make dist` writes wheels of the kernel and every bundled plugin" in prose
    assert "(`python3 -m venv ~/tarka && . ~/tarka/bin/activate`), still in the repository root:" in prose
    author, user = readme_plugin_blocks()[:2]
    assert all(line.startswith(("python -m pip ", "python -m pytest ", "dharma ")) for line in author + user)
    assert any("--find-links dist" in line and "-c constraints.txt" in line for line in author)


def shell(line: str, cwd: Path, venv: Path, home: Path) -> subprocess.CompletedProcess:
    """One README line, as typed in a shell with ``venv`` activated; pip is offline through its own
    environment (an online user needs none of it), with its cache under ``home``."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "DHARMA_"))
    }
    env |= {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(venv),
        "NO_COLOR": "1",
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",  # pip's spelling of --no-build-isolation
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_CACHE_DIR": str(home / "pip-cache"),
    }
    return subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_from_new_plugin_to_a_wheel_that_another_venv_installs_and_assembles(tmp_path):
    """SLOW (about 2 min): README's "Writing a plugin" as written, in two fresh venvs; also the head template.

    `make dist` (to a temporary directory), then README's two blocks line by line in a directory
    holding that dist/ and the repository's constraints.txt, each venv activated.
    """
    make = ["make", "--no-print-directory", "-C", ROOT, "-o", ".venv/.installed", "dist",
            f"DIST={tmp_path / 'dist'}", f"PY={sys.executable}"]  # fmt: skip
    count = len(list(ROOT.glob("plugins/*/*/pyproject.toml"))) + 1  # and the kernel
    assert check(run(make, tmp_path)).strip() == f"{tmp_path / 'dist'}: {count} wheels, {count} sdists"
    (tmp_path / "constraints.txt").symlink_to(ROOT / "constraints.txt")
    deps = shared_deps(tmp_path)
    author_block, user_block = readme_plugin_blocks()[:2]

    author = make_venv(tmp_path / "author", deps)
    said = {}
    for line in author_block:
        result = shell(line, tmp_path, author, tmp_path)
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        said[line.split("#")[0].strip()] = result.stdout
    tests = said["python -m pytest ./dharma-plugin-tarka"].strip().splitlines()[-1]
    assert re.match(r"=+ 16 passed in ", tests), tests  # as README says; nothing skipped: installed
    listed = said["dharma plugins --check"]
    assert re.search(r"^ *darshanas\.tarka +dharma-plugin-tarka +0\.1\.0 .* ok *$", listed, re.M), listed
    rows = plugin_rows(author, "--check")
    keys = ("ref", "kind", "distribution", "version", "module_api", "status")
    assert [tuple(r[k] for k in keys) for r in rows] == [
        ("darshanas.tarka", "module", "dharma-plugin-tarka", "0.1.0", MODULE_API, "ok"),
    ]
    published = tmp_path / "published"
    assert [p.name for p in published.iterdir()] == ["dharma_plugin_tarka-0.1.0-py3-none-any.whl"]

    # The head template, in the same venv: written, installed, its tests pass.
    gloss = tmp_path / "gloss"
    check(dharma(author, "new-plugin", "gloss", "--kind", "head", "-o", gloss))
    check(pip(author, "install", *OFFLINE, "--find-links", tmp_path / "dist", "-e", gloss))
    result = run([author / "bin" / "python", "-m", "pytest", gloss, "-q", "-p", "no:cacheprovider"], tmp_path)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and re.match(r"9 passed in ", summary), result.stdout[-3000:]

    user = make_venv(tmp_path / "user", deps)
    tiny_manifest(tmp_path / "manifest.toml", '"tarka"')
    for line in user_block:
        result = shell(line, tmp_path, user, tmp_path)
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert dharma_distributions(user) == ["dharma-kernel", "dharma-plugin-tarka"]  # the kernel, from dist
    assert [(r["ref"], r["status"]) for r in plugin_rows(user, "--check")] == [("darshanas.tarka", "ok")]
    name, refs, kernel = load_saved(user, tmp_path / "model")
    assert (name, refs) == ("DharmaModel", "darshanas.tarka")
    assert kernel.startswith(str(user)), kernel  # the user venv's kernel, from the wheel
