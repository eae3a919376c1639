"""Plugins as a user installs them: wheels, a fresh venv, pip offline, the installed `dharma` script.

The fresh venv sees none of the development venv's dharma distributions. It reuses that
venv's third-party packages (torch, transformers, ...) through a directory of symlinks
named in a ``.pth`` file, so pip counts them as installed and never looks for a download.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from dharma_kernel.catalogue import distribution_for

ROOT = Path(__file__).resolve().parents[1]
KEPT = "darshanas.vedanta"
REMOVED = "paths.dharma"  # the plugin the uninstall test removes
TINY = 'config = { architecture = "gpt2", n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 97 }'
DHARMA_PREFIXES = ("dharma", "_dharma", "__editable__", "_editable_impl")


@dataclass
class Setup:
    wheels: Path
    deps: Path


def plugin_dir(ref: str) -> Path:
    return ROOT / "plugins" / ref.replace(".", "/")


def run(command: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd outside the repository, and no PYTHONPATH: only what is installed may be imported.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env |= {"NO_COLOR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def check(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """Wheels of the kernel and both plugins, and the symlinked third-party packages."""
    pytest.importorskip("hatchling", reason="building the wheels needs hatchling in this venv")
    base = tmp_path_factory.mktemp("packaging")
    wheels, deps = base / "wheels", base / "deps"
    dirs = [ROOT, plugin_dir(KEPT), plugin_dir(REMOVED)]
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    check(run([*pip_wheel, "-w", wheels, *dirs], base))
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if not entry.name.lower().startswith(DHARMA_PREFIXES):
            (deps / entry.name).symlink_to(entry)
    return Setup(wheels, deps)


@pytest.fixture
def venv(setup: Setup, tmp_path: Path) -> Path:
    """A fresh venv that has only the kernel (from its wheel); pip comes from the shared packages."""
    venv = tmp_path / "venv"
    check(run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path))
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "shared-deps.pth").write_text(f"{setup.deps}\n")
    listed = json.loads(check(pip(venv, "list", "--format", "json")))
    names = {row["name"].lower() for row in listed}
    assert {"torch", "transformers", "pydantic", "typer", "pluggy", "safetensors"} <= names
    assert not [name for name in names if name.startswith("dharma")]
    check(pip(venv, "install", "--no-index", "--find-links", setup.wheels, "dharma-kernel"))
    return venv


def pip(venv: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run([venv / "bin" / "python", "-m", "pip", *args], venv.parent)


def dharma(venv: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run([venv / "bin" / "dharma", *args], venv.parent)


def installed_refs(venv: Path) -> list[str]:
    return [row["ref"] for row in json.loads(check(dharma(venv, "plugins", "--json")))]


def manifest(path: Path, include: str) -> Path:
    modules = f'preset = "tiny"\ninclude = [{include}]\nat_layers = [0, 1]'
    path.write_text(f'[model]\nname = "t"\n[backbone]\n{TINY}\n[modules]\n{modules}\n')
    return path


def test_a_plugin_wheel_installs_into_a_venv_that_has_the_kernel(setup: Setup, venv: Path) -> None:
    assert installed_refs(venv) == []
    check(pip(venv, "install", "--no-index", "--find-links", setup.wheels, distribution_for(KEPT)))
    assert installed_refs(venv) == [KEPT]

    path = manifest(venv.parent / "m.toml", '"vedanta"')
    assert "ok (no weights allocated)" in check(dharma(venv, "validate", path))
    out = venv.parent / "out"
    check(dharma(venv, "assemble", path, "-o", out))
    code = (
        "import dharma_kernel, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(type(m).__name__, m.module_refs, dharma_kernel.__file__)"
    )
    name, refs, source = check(run([venv / "bin" / "python", "-c", code], venv.parent)).split(" ", 2)
    assert (name, refs) == ("DharmaModel", f"['{KEPT}']")
    assert source.startswith(str(venv))  # the wheel's copy, not the repository's


def test_uninstalling_a_plugin_removes_it_and_all_names_it_missing(setup: Setup, venv: Path) -> None:
    dists = [distribution_for(KEPT), distribution_for(REMOVED)]
    check(pip(venv, "install", "--no-index", "--find-links", setup.wheels, *dists))
    assert sorted(installed_refs(venv)) == sorted([KEPT, REMOVED])

    check(pip(venv, "uninstall", "-y", distribution_for(REMOVED)))
    assert installed_refs(venv) == [KEPT]
    result = dharma(venv, "validate", manifest(venv.parent / "m.toml", '"all"'))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"{REMOVED}: pip install {distribution_for(REMOVED)}" in result.stderr
    assert f"{KEPT}: pip install" not in result.stderr
