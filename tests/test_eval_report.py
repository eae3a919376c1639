"""``dharma eval`` says what it read and at what length: the data report (text and --json),
the trained length by default, and a progress bar on a terminal."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console
from trainkit import write_manifest

from dharma_kernel.testing import cli_output as dharma
from dharma_kernel.testing import run_cli
from dharma_kernel.train.progress import item_bar
from dharma_kernel.train.run import TrainOptions, train

GOOD = [
    "Dharma is the duty that holds a life together in every season.",
    "The river carries silt to the delta, where the soil grows rice.",
    "Seva means service given freely, a gift that asks for nothing back.",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 2 steps at max_length 32 (64 positions), and a held-out file with
    3 good records, 2 duplicates, one too short and one malformed line (record 6)."""
    folder = tmp_path_factory.mktemp("evalreport")
    manifest = write_manifest(folder, modules=False, train={"max_steps": 2, "eval_every": 2})
    train(manifest, TrainOptions(), Console(file=io.StringIO()))
    lines = [json.dumps({"text": t}) for t in (GOOD[0], GOOD[1], GOOD[0], GOOD[2], "Too short.")]
    lines += ["{not json", json.dumps({"text": GOOD[1]})]
    held_out = folder / "held_out.jsonl"
    held_out.write_text("\n".join(lines) + "\n")
    return folder / "run", held_out


def test_eval_reports_records_read_kept_and_dropped_at_the_trained_length(capsys, trained):
    run, held_out = trained
    result = json.loads(dharma(capsys, "eval", run, "--data", held_out, "--json"))
    data = result["data"]
    counts = data["files_read"], data["files_skipped"], data["records_read"], data["records_kept"]
    assert counts == (1, 0, 7, 3)
    assert data["dropped"] == {"empty": 0, "too_short": 1, "duplicate": 2, "malformed": 1}
    assert len(data["problems"]) == 1 and data["problems"][0].startswith(f"{held_out}:6: ")
    assert result["max_length"] == 32  # the model's data.max_length, not 256
    assert result["sequences"] >= 1 and result["tokens"] > 20

    printed = dharma(capsys, "eval", run, "--data", held_out)
    assert "records: 7 read, 3 kept" in printed
    assert "dropped: 0 empty, 1 too_short, 2 duplicate, 1 malformed" in printed
    assert f"{result['tokens']:,} tokens in {result['sequences']} sequences of up to 32" in printed

    shorter = json.loads(dharma(capsys, "eval", run, "--data", held_out, "--json", "--max-length", 16))
    assert shorter["max_length"] == 16 and shorter["sequences"] > result["sequences"]
    code, _, err = run_cli(capsys, "eval", run, "--data", held_out, "--max-length", 100)
    assert code == 2 and "error: --max-length 100 is more than the model's 64 positions" in err


def test_the_progress_bar_counts_every_item_on_a_terminal_only():
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=80)
    with item_bar(terminal, 3, "sequences of 32 tokens") as advance:
        for _ in range(3):
            advance(1)
    assert "3/3 sequences of 32 tokens" in screen.getvalue()

    piped = io.StringIO()
    with item_bar(Console(file=piped, force_terminal=False), 3, "records") as advance:
        advance(3)
    assert piped.getvalue() == ""
