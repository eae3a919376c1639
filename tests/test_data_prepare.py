"""A manifest's data end to end: which files, what is held out, what is packed, and the errors users meet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dharma_kernel.data import DataReport, prepare_data, read_data, train_tokenizer
from dharma_kernel.errors import DharmaError
from dharma_kernel.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-data"

FRESH = (
    '[backbone]\nconfig = { architecture = "gpt2", n_layer = 1, n_embd = 8, n_head = 1, vocab_size = 600 }\n'
)
PARAGRAPHS = [
    "Karma yoga is action offered without attachment to its fruit.",
    "Bhakti is the path of devotion; the devotee sees the divine everywhere.",
    "Jnana is the path of knowledge: discerning the real from the unreal.",
    "Seva is selfless service, given without thought of reward or praise.",
    "Ahimsa, non-harming, is the first of the restraints in Patanjali's yoga.",
    "Dharma is duty, and also the order that holds the world together.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(PARAGRAPHS * 3, vocab_size=400)


def write_manifest(directory: Path, data: str, extra: str = "") -> Path:
    path = directory / "m.toml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{FRESH}{extra}\n[data]\n{data}\n", encoding="utf-8")
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_the_foundation_manifest_gives_train_and_a_held_out_eval_set():
    manifest = load_manifest(ROOT / "examples" / "foundation.toml")

    data = read_data(manifest)
    tokenizer = train_tokenizer(data.texts, vocab_size=1000)
    train, evaluation, report = prepare_data(manifest, tokenizer, records=data)

    assert (len(data.train), len(data.eval)) == (390, 108)  # the corpus; examples/heldout's paragraphs
    assert not {r.text for r in data.train} & {r.text for r in data.eval}
    assert {Path(r.source).parent.name for r in data.eval} == {"heldout"}
    # 6 corpus files, conversations.jsonl, heldout.txt; the task sets beside them are not read
    assert (report.files_read, report.files_skipped, report.records_kept) == (8, 0, 498)
    assert train.input_ids.shape[1] == evaluation.input_ids.shape[1] == 128
    assert len(evaluation) > 0 and evaluation.tokens > 0
    assert train.concept_labels is None


def test_prepare_data_reads_the_files_itself_and_labels_the_modules(tokenizer, tmp_path):
    write(tmp_path / "corpus" / "a.txt", "\n\n".join(PARAGRAPHS))
    manifest = load_manifest(
        write_manifest(tmp_path, 'train = ["corpus"]\neval_fraction = 0.2\nmax_length = 16')
    )

    train, evaluation, report = prepare_data(manifest, tokenizer, ["paths.karma", "paths.seva"])

    assert report.records_kept == 6
    assert evaluation is not None and len(evaluation) >= 1
    assert train.concept_labels.shape == (len(train), 16, 2)
    assert train.refs == ("paths.karma", "paths.seva")


def test_data_from_the_command_line_is_relative_to_the_working_directory(tokenizer, tmp_path, monkeypatch):
    write(tmp_path / "here" / "mine.jsonl", "\n".join(json.dumps({"text": p}) for p in PARAGRAPHS[:3]))
    manifest = load_manifest(
        write_manifest(tmp_path / "elsewhere", 'train = ["missing"]\neval_fraction = 0.0')
    )
    monkeypatch.chdir(tmp_path / "here")

    train, evaluation, report = prepare_data(manifest, tokenizer, paths=["mine.jsonl"])

    assert evaluation is None
    assert report.records_kept == 3
    assert tokenizer.decode(train.input_ids[0][: train.attention_mask[0].sum()]).startswith(PARAGRAPHS[0])


def test_eval_files_are_used_as_given_less_what_train_already_has(tmp_path):
    write(tmp_path / "train.txt", "\n\n".join(PARAGRAPHS[:4]))
    write(tmp_path / "eval.txt", "\n\n".join(PARAGRAPHS[3:]))
    manifest = load_manifest(write_manifest(tmp_path, 'train = ["train.txt"]\neval = ["eval.txt"]'))

    data = read_data(manifest)

    assert [r.text for r in data.train] == PARAGRAPHS[:4]
    assert [r.text for r in data.eval] == PARAGRAPHS[4:]
    assert data.report.dropped["duplicate"] == 1
    assert data.report.records_read == data.report.records_kept + sum(data.report.dropped.values())


def test_no_training_data_named_says_where_to_name_it(tokenizer, tmp_path):
    manifest = load_manifest(write_manifest(tmp_path, ""))

    with pytest.raises(DharmaError) as caught:
        prepare_data(manifest, tokenizer)

    assert caught.value.message == "no training data: data.train is empty"
    assert "--data PATH" in caught.value.hint


def test_no_text_left_says_what_was_read_and_dropped(tokenizer, tmp_path):
    write(tmp_path / "d" / "short.txt", "Om.\n\nShanti.\n\nOm.")
    write(tmp_path / "d" / "table.csv", "a,b\n")
    manifest = load_manifest(write_manifest(tmp_path, 'train = ["d"]'))

    with pytest.raises(DharmaError) as caught:
        prepare_data(manifest, tokenizer)

    assert caught.value.message == (
        f"no training text in {tmp_path / 'd'}: 1 file(s) read, 1 skipped; "
        "3 record(s) read, all dropped (3 too_short); "
        f"problems: {tmp_path / 'd' / 'table.csv'}: unknown file type '.csv'; "
        "readers exist for .json, .jsonl, .txt"
    )
    assert "lower data.min_chars (now 20)" in caught.value.hint


def test_a_missing_path_is_named(tokenizer, tmp_path):
    manifest = load_manifest(write_manifest(tmp_path, 'train = ["nowhere"]'))

    with pytest.raises(DharmaError, match=r"nowhere: no such file or directory"):
        prepare_data(manifest, tokenizer)


def test_strict_stops_at_a_malformed_record_and_not_strict_skips_it(tokenizer, tmp_path):
    lines = [json.dumps({"text": p}) for p in PARAGRAPHS[:3]]
    path = write(tmp_path / "a.jsonl", "\n".join([lines[0], '{"text": 3}', *lines[1:]]))
    manifest = load_manifest(write_manifest(tmp_path, 'train = ["a.jsonl"]\nstrict = true'))

    with pytest.raises(DharmaError, match=rf"^{path}:2: field 'text' should be a string, not int"):
        prepare_data(manifest, tokenizer)
    report = DataReport()
    train, _, returned = prepare_data(manifest, tokenizer, strict=False, report=report)

    assert returned is report
    assert (report.records_read, report.records_kept, report.dropped["malformed"]) == (4, 3, 1)
    assert report.problems == [(str(path), 2, "field 'text' should be a string, not int")]


def test_rows_longer_than_the_tokenizer_allows_are_refused(tmp_path):
    write(tmp_path / "a.txt", "\n\n".join(PARAGRAPHS))
    manifest = load_manifest(write_manifest(tmp_path, 'train = ["a.txt"]\nmax_length = 512'))
    small = train_tokenizer(PARAGRAPHS, vocab_size=300, model_max_length=256)

    with pytest.raises(
        DharmaError, match="data.max_length: 512 is longer than the tokenizer's model_max_length"
    ):
        prepare_data(manifest, small)


@pytest.mark.skipif(not SEED.is_dir(), reason=f"no seed data at {SEED}")
def test_the_seed_data_packs_whole(tmp_path):
    manifest = load_manifest(write_manifest(tmp_path, f"train = [{json.dumps(str(SEED))}]\nmax_length = 256"))

    data = read_data(manifest)
    tokenizer = train_tokenizer(data.texts, vocab_size=2000)
    train, evaluation, report = prepare_data(manifest, tokenizer, records=data)

    assert report.records_kept == len(data.train) + len(data.eval) == 3713
    assert report.problems == []
    stream = train.input_ids[train.attention_mask == 1]
    assert int((stream == tokenizer.eos_token_id).sum()) == len(data.train)
    assert len(evaluation) > 0


def test_strict_stops_at_a_file_it_cannot_read(tokenizer, tmp_path):
    write(tmp_path / "d" / "good.txt", "\n\n".join(PARAGRAPHS))
    bad = write(tmp_path / "d" / "records.json", '[{"text": "Karma is action."},')
    manifest = load_manifest(write_manifest(tmp_path, 'train = ["d"]\nstrict = true'))

    with pytest.raises(DharmaError, match=rf"^{bad}: invalid JSON at line 1"):
        prepare_data(manifest, tokenizer)
    _, _, report = prepare_data(manifest, tokenizer, strict=False)

    assert (report.files_read, report.files_skipped, report.records_kept) == (1, 1, 6)
