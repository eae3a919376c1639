"""What README's commands write in the repository root is ignored by git."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = [
    "runs/assembled/config.json",  # dharma assemble -o runs/assembled
    "apps/classifier/application.json",  # dharma finetune ... -o apps/classifier
    "model.onnx",  # dharma export --format onnx -o model.onnx
    "model.pt2",  # dharma export --format torch-export -o model.pt2
    "page.html",  # dharma explain ... --html page.html
    "dist/dharma_kernel-0.1.0-py3-none-any.whl",  # make dist
    "dharma-plugin-tarka/pyproject.toml",  # Writing a plugin
    "published/dharma_plugin_tarka-0.1.0-py3-none-any.whl",
    "model/config.json",
    "manifest.toml",
]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_readme_outputs_are_ignored():
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *OUTPUTS], cwd=ROOT, capture_output=True, text=True
    )
    assert sorted(result.stdout.split()) == sorted(OUTPUTS), result.stderr
