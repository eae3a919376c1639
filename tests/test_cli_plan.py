"""`dharma plan` as a user runs it: the estimate table, the settings that fit, exit codes."""

from __future__ import annotations

import re
from pathlib import Path

from fakedists import run_dharma

ROOT = Path(__file__).resolve().parents[1]
TINY = """\
[model]
name = "t"
[backbone]
config = { architecture = "gpt2", n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 97 }
[modules]
preset = "tiny"
include = ["dharma", "vedanta"]
at_layers = [0, 1]
composition = "routed"
[data]
max_length = 64
[train]
batch_size = 4
"""


def write(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def printed_bytes(stdout: str, part: str) -> int:
    match = re.search(rf"^\s*{part}\s+[\d.]+\s+([\d,]+)\s*$", stdout, re.MULTILINE)
    assert match, stdout
    return int(match[1].replace(",", ""))


def test_plan_prints_the_estimate_of_the_manifest(tmp_path):
    from dharma_kernel.assemble import build_on_meta, plan_manifest
    from dharma_kernel.train.memory import estimate

    path = write(tmp_path)
    result = run_dharma(None, "plan", str(path), "--memory", "1GiB", "--batch-size", "2", "--length", "16")
    assert result.returncode == 0, result.stderr
    assert f"{path}: batch 2 x 16 tokens; gradient_checkpointing false" in result.stdout
    assert "precision auto (counted as fp32)" in result.stdout
    manifest, plan = plan_manifest(path)
    expected = estimate(build_on_meta(plan), 2, 16, manifest.train)
    for part, value in expected.parts():
        assert printed_bytes(result.stdout, part) == value
    assert "budget 1.00 GiB (1,073,741,824 bytes): fits" in result.stdout
    assert re.search(r"^\s*none\s+[\d.]+\s*$", result.stdout, re.MULTILINE)  # its own settings come first
    # defaults: the manifest's train.batch_size and data.max_length
    default = run_dharma(None, "plan", str(path), "--memory", "4GB")
    assert "batch 4 x 64 tokens" in default.stdout
    assert "budget 3.73 GiB (4,000,000,000 bytes)" in default.stdout


def test_plan_seed_lists_the_switches_that_fit(tmp_path):
    result = run_dharma(None, "plan", str(ROOT / "examples" / "seed-262m.toml"), "--memory", "4GiB")
    assert result.returncode == 0, result.stderr
    assert printed_bytes(result.stdout, "parameters") == 258_200_290 * 4
    assert "does not fit" in result.stdout
    lines = result.stdout.split("settings that fit, fewest changes first:")[1].splitlines()
    assert lines[2].split()[:3] == ["optimizer_state", "=", '"bf16"']
    rows = [line.strip() for line in lines[2:] if re.search(r"\d\.\d\d$", line.strip())]
    in_backward = [row for row in rows if "optimizer_in_backward = true" in row]
    assert in_backward and all("grad_accum = 1" in row for row in in_backward)  # what it needs, same row
    assert not any("grad_accum" in row for row in rows if row not in in_backward)
    assert (
        "needs grad_accum = 1: a step then trains on 1 sequence instead of 16; to keep 16, plan again "
        "with --batch-size 16"
    ) in result.stdout


def test_plan_when_nothing_fits(tmp_path):
    result = run_dharma(None, "plan", str(write(tmp_path)), "--memory", "1048576")
    assert result.returncode == 0, result.stderr
    assert "budget 0.00 GiB (1,048,576 bytes): does not fit" in result.stdout
    assert "no settings fit: the least memory is" in result.stdout


def test_plan_user_errors_exit_2_without_traceback(tmp_path):
    path = write(tmp_path)
    for args, fragment in [
        (["--memory", "4 gigs"], "error: --memory: '4 gigs' is not a memory size"),
        (["--memory", "0"], "error: --memory: '0' is not a memory size"),
    ]:
        result = run_dharma(None, "plan", str(path), *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(fragment)
        assert "Traceback" not in result.stderr
    missing = run_dharma(None, "plan", str(tmp_path / "nope.toml"), "--memory", "4GiB")
    assert (
        missing.returncode == 2
        and f"error: {tmp_path / 'nope.toml'}: no such file or directory" in missing.stderr
    )
    assert "Traceback" not in missing.stderr
    no_budget = run_dharma(None, "plan", str(path))
    assert no_budget.returncode == 2 and "--memory" in no_budget.stderr
