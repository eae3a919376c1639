"""examples/third_party_plugin: its wheel installs beside the kernel's, passes its tests, assembles."""

from __future__ import annotations

import re

import pytest
from venvkit import (
    OFFLINE,
    ROOT,
    build_wheels,
    check,
    dharma,
    dharma_distributions,
    load_saved,
    make_venv,
    pip,
    plugin_rows,
    run,
    shared_deps,
)

EXAMPLE = ROOT / "examples" / "third_party_plugin"


@pytest.mark.slow
def test_the_example_installs_from_its_wheel_and_assembles_its_manifest(tmp_path):
    """SLOW (about a minute): wheels, a fresh venv, the plugin's own tests there, validate and assemble."""
    wheels = build_wheels([ROOT, EXAMPLE], tmp_path / "wheels")
    venv = make_venv(tmp_path / "venv", shared_deps(tmp_path))
    check(pip(venv, "install", *OFFLINE, "--find-links", wheels, "dharma-plugin-prana"))
    assert dharma_distributions(venv) == ["dharma-kernel", "dharma-plugin-prana"]

    rows = plugin_rows(venv, "--check")
    assert [(r["ref"], r["kind"], r["family"], r["distribution"], r["status"]) for r in rows] == [
        ("energy.prana", "module", "energy", "dharma-plugin-prana", "ok")
    ]

    result = run([venv / "bin" / "python", "-m", "pytest", EXAMPLE, "-q", "-p", "no:cacheprovider"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.match(
        r"16 passed in ", result.stdout.strip().splitlines()[-1]
    )  # nothing skipped: it is installed

    manifest = EXAMPLE / "manifest.toml"
    validated = check(dharma(venv, "validate", manifest))
    assert "modules: 1 at layers [1, 3], sequential, preset tiny" in validated
    check(dharma(venv, "assemble", manifest, "-o", tmp_path / "model"))
    name, refs, kernel = load_saved(venv, tmp_path / "model")
    assert (name, refs) == ("DharmaModel", "energy.prana")
    assert kernel.startswith(str(venv))
    config = (tmp_path / "model" / "config.json").read_text()
    assert '"inner": 12' in config and '"distribution": "dharma-plugin-prana"' in config
