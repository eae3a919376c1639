"""`make dist` and the version metadata every distribution carries."""

from __future__ import annotations

import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from venvkit import (
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

from dharma_kernel.catalogue import distribution_for
from dharma_kernel.version import MODULE_API, __version__

PYPROJECTS = sorted(ROOT.glob("plugins/*/*/pyproject.toml"))


def next_breaking(version: str) -> Version:
    major, minor = Version(version).release[:2]
    return Version(f"{major}.{minor + 1}" if major == 0 else f"{major + 1}")


@pytest.mark.parametrize("path", PYPROJECTS, ids=lambda p: p.parent.name)
def test_every_plugin_depends_on_a_compatible_kernel_and_declares_its_api(path: Path) -> None:
    project = tomllib.loads(path.read_text())["project"]
    kernel = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "dharma-kernel"]
    assert len(kernel) == 1, f"{path}: one dharma-kernel requirement"
    assert kernel[0].specifier.contains(__version__), f"{path}: {kernel[0]} excludes this kernel"
    assert not kernel[0].specifier.contains(next_breaking(__version__)), (
        f"{path}: {kernel[0]} has no upper bound"
    )

    points = project["entry-points"]
    kind, group = ("head", "dharma.heads") if "dharma.heads" in points else ("module", "dharma.modules")
    (ref,) = points[group]
    assert project["name"] == distribution_for(ref, kind)
    assert points["dharma.api"] == {ref: MODULE_API}


@pytest.mark.slow
def test_make_dist_builds_every_distribution_and_vedanta_installs_alone(tmp_path: Path) -> None:
    """SLOW (about 40 s): all wheels and sdists, then a fresh venv installs vedanta from them offline."""
    dist = tmp_path / "dist"
    make = [
        "make",
        "--no-print-directory",
        "-C",
        ROOT,
        "-o",
        ".venv/.installed",
        "dist",
        f"DIST={dist}",
        f"PY={sys.executable}",
    ]
    made = run(make, tmp_path)
    count = len(PYPROJECTS) + 1
    # one line: hatchling's lines about every file go to a log shown only when a build fails
    assert check(made).splitlines() == [f"{dist}: {count} wheels, {count} sdists"] and made.stderr == ""
    names = ["dharma-kernel", *(tomllib.loads(p.read_text())["project"]["name"] for p in PYPROJECTS)]
    stems = sorted(f"{name.replace('-', '_')}-0.1.0" for name in names)
    assert sorted(p.name.removesuffix("-py3-none-any.whl") for p in dist.glob("*.whl")) == stems
    assert sorted(p.name.removesuffix(".tar.gz") for p in dist.glob("*.tar.gz")) == stems
    with tarfile.open(dist / f"dharma_kernel-{__version__}.tar.gz") as sdist:
        tops = {Path(name).parts[1] for name in sdist.getnames() if len(Path(name).parts) > 1}
    assert tops == {"dharma_kernel", "docs", "README.md", "pyproject.toml", "PKG-INFO", ".gitignore"}

    venv = make_venv(tmp_path / "venv", shared_deps(tmp_path))
    check(pip(venv, "install", "--no-index", "--find-links", dist, "dharma-plugin-vedanta"))
    assert dharma_distributions(venv) == [
        "dharma-kernel",
        "dharma-plugin-vedanta",
    ]  # the kernel as a dependency
    rows = plugin_rows(venv, "--check")
    assert [(r["ref"], r["distribution"], r["version"], r["status"]) for r in rows] == [
        ("darshanas.vedanta", "dharma-plugin-vedanta", "0.1.0", "ok")
    ]
    manifest = tiny_manifest(tmp_path / "m.toml", '"vedanta"')
    check(dharma(venv, "assemble", manifest, "-o", tmp_path / "model"))
    name, refs, kernel = load_saved(venv, tmp_path / "model")
    assert (name, refs) == ("DharmaModel", "darshanas.vedanta")
    assert kernel.startswith(str(venv))  # the wheel's kernel, not the repository's


def test_make_dist_shows_hatchlings_output_when_a_build_fails(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "dharma-plugin-broken"\nversion = "not a version"\n'
    )
    make = ["make", "--no-print-directory", "-C", ROOT, "-o", ".venv/.installed", "dist",
            f"DIST={tmp_path / 'dist'}", f"PY={sys.executable}", f"PLUGIN_DIRS={broken}"]  # fmt: skip
    made = run(make, tmp_path)
    assert made.returncode != 0
    assert f"make dist: building {broken} failed (output above)" in made.stderr
    assert "not a version" in made.stdout + made.stderr  # hatchling's own reason
