"""``dharma new-plugin``: names are checked, and what it writes installs, passes its tests and is listed."""

from __future__ import annotations

import re
import tomllib

import pytest
from fakedists import install, run_dharma
from packaging.requirements import Requirement
from venvkit import (
    OFFLINE,
    ROOT,
    build_wheels,
    check,
    dharma,
    load_saved,
    make_venv,
    pip,
    plugin_rows,
    run,
    shared_deps,
    tiny_manifest,
)

from dharma_kernel import registry
from dharma_kernel.cli_new_plugin import plan_plugin
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


@pytest.mark.slow
def test_from_new_plugin_to_a_wheel_that_another_venv_installs_and_assembles(tmp_path):
    """SLOW (about 90 s): the README's walkthrough, in two fresh venvs; also the head template.

    Offline here, so pip gets --no-index --no-build-isolation and the kernel comes from its
    wheel; a user online runs the same commands without them.
    """
    wheels = build_wheels([ROOT], tmp_path / "wheels")
    deps = shared_deps(tmp_path)
    author = make_venv(tmp_path / "author", deps)
    check(pip(author, "install", *OFFLINE, "--find-links", wheels, "dharma-kernel"))
    assert plugin_rows(author) == []

    tarka, gloss = tmp_path / "dharma-plugin-tarka", tmp_path / "gloss"
    check(dharma(author, "new-plugin", "tarka", "--family", "darshanas", "-o", tarka))
    check(dharma(author, "new-plugin", "gloss", "--kind", "head", "-o", gloss))
    check(pip(author, "install", *OFFLINE, "--find-links", wheels, "-e", tarka, "-e", gloss))
    for directory, expected in ((tarka, "16 passed"), (gloss, "9 passed")):  # nothing skipped: installed
        result = run(
            [author / "bin" / "python", "-m", "pytest", directory, "-q", "-p", "no:cacheprovider"], tmp_path
        )
        summary = result.stdout.strip().splitlines()[-1]
        assert result.returncode == 0 and re.match(rf"{expected} in ", summary), result.stdout[-3000:]
    rows = plugin_rows(author, "--check")
    assert [
        (r["ref"], r["kind"], r["distribution"], r["version"], r["module_api"], r["status"]) for r in rows
    ] == [
        ("darshanas.tarka", "module", "dharma-plugin-tarka", "0.1.0", MODULE_API, "ok"),
        ("gloss", "head", "dharma-head-gloss", "0.1.0", MODULE_API, "ok"),
    ]

    # Publish: a wheel; another venv installs it, with the kernel as its dependency, and assembles.
    published = tmp_path / "published"
    check(
        run(
            [author / "bin" / "python", "-m", "pip", "wheel", "--no-deps", *OFFLINE, "-w", published, tarka],
            tmp_path,
        )
    )
    assert [p.name for p in published.iterdir()] == ["dharma_plugin_tarka-0.1.0-py3-none-any.whl"]
    user = make_venv(tmp_path / "user", deps)
    check(
        pip(
            user,
            "install",
            "--no-index",
            "--find-links",
            wheels,
            "--find-links",
            published,
            "dharma-plugin-tarka",
        )
    )
    assert [(r["ref"], r["status"]) for r in plugin_rows(user, "--check")] == [("darshanas.tarka", "ok")]
    manifest = tiny_manifest(tmp_path / "m.toml", '"tarka"')
    check(dharma(user, "assemble", manifest, "-o", tmp_path / "model"))
    name, refs, kernel = load_saved(user, tmp_path / "model")
    assert (name, refs) == ("DharmaModel", "darshanas.tarka")
    assert kernel.startswith(str(user)), kernel  # the user venv's kernel, from the wheel
