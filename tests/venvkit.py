"""Fresh virtual environments that install Dharma distributions offline, as a user's venv would.

A fresh venv sees none of the development venv's dharma distributions. It reuses that venv's
third-party packages (torch, transformers, pytest, hatchling, ...) through a directory of
symlinks named in a ``.pth`` file, so pip counts them as installed and never downloads; every
dharma distribution comes from wheels built here. (The approach of tests/test_packaging.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DHARMA_PREFIXES = ("dharma", "_dharma", "__editable__", "_editable_impl")
OFFLINE = ("--no-index", "--no-build-isolation")  # what a user online leaves out


def run(
    command: list[str | Path], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``command`` with cwd outside the repository and no PYTHON*/PIP_* variables: only what is installed."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "DHARMA_"))
    }
    clean |= {"NO_COLOR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})}
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, env=clean, cwd=cwd, timeout=600
    )


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def shared_deps(base: Path) -> Path:
    """A directory of symlinks to every non-dharma package of the development venv."""
    deps = base / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(DHARMA_PREFIXES):
            (deps / entry.name).symlink_to(entry)
    return deps


def build_wheels(directories: list[Path], out: Path) -> Path:
    """Wheels of ``directories`` (kernel, plugins) into ``out``, with the installed hatchling."""
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out]
    check(run([*pip_wheel, *directories], out.parent))
    return out


def make_venv(path: Path, deps: Path) -> Path:
    """A venv with no dharma distribution; pip and the rest come from ``deps``."""
    check(run([sys.executable, "-m", "venv", "--without-pip", path], path.parent))
    (site,) = (path / "lib").glob("python*/site-packages")
    (site / "shared-deps.pth").write_text(f"{deps}\n")
    return path


def pip(venv: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return run([venv / "bin" / "python", "-m", "pip", *args], venv.parent)


def dharma(venv: Path, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run([venv / "bin" / "dharma", *args], venv.parent, env)


def dharma_distributions(venv: Path) -> list[str]:
    listed = json.loads(check(pip(venv, "list", "--format", "json")))
    return sorted(row["name"].lower() for row in listed if row["name"].lower().startswith("dharma"))


def plugin_rows(venv: Path, *args: str) -> list[dict]:
    return json.loads(check(dharma(venv, "plugins", "--json", *args)))


TINY_BACKBONE = 'config = { architecture = "gpt2", n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 97 }'


def tiny_manifest(path: Path, include: str) -> Path:
    """A manifest with a tiny fresh backbone and ``include`` (TOML list items) at both layers."""
    path.write_text(
        f'[model]\nname = "t"\n[backbone]\n{TINY_BACKBONE}\n'
        f'[modules]\npreset = "tiny"\ninclude = [{include}]\nat_layers = [0, 1]\n'
    )
    return path


def load_saved(venv: Path, directory: Path) -> list[str]:
    """Load a saved model with the venv's transformers: its class name, module refs, kernel file."""
    code = (
        "import dharma_kernel, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(directory)!r})\n"
        "print(type(m).__name__); print(','.join(m.module_refs)); print(dharma_kernel.__file__)"
    )
    return check(run([venv / "bin" / "python", "-c", code], venv.parent)).split()
