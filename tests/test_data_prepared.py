"""Prepared data: the rows prepare_data gives in memory, written once to memory-mapped shards, cached
by fingerprint, prepared again (and saying why) when an input changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dying_clean import clean_or_die
from fakedists import run_dharma

from dharma_kernel.data import prepare as prepare_module
from dharma_kernel.data import prepare_data, read_data, train_tokenizer
from dharma_kernel.data.cache import cache_root, prepared_data
from dharma_kernel.data.prepare import open_prepared, prepare
from dharma_kernel.data.shards import id_dtype
from dharma_kernel.errors import DharmaError
from dharma_kernel.manifest import load_manifest
from dharma_kernel.train.eval_rows import eval_rows
from dharma_kernel.train.windows import Windows

REFS = ["paths.karma", "paths.seva"]
TEXTS = [
    f"{opening} {middle} (verse {n})"
    for n in range(9)
    for opening, middle in [
        ("Karma yoga is action offered", "without attachment to its fruit, says the Gita."),
        ("Seva is selfless service,", "given without thought of reward; karma done for others."),
        ("The river carries silt", "to the delta, where the soil grows rice for the villages."),
    ]
]
CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"What is seva, question {n}?"},
            {"role": "assistant", "content": f"Seva is service given freely ({n})."},
        ]
    }  # fmt: skip
    for n in range(4)
]
SPLIT_FILES = ("ids", "trained", "real", "concepts")


def write_corpus(directory: Path, max_length: int = 45, eval_fraction: float = 0.2, extra: str = "") -> Path:
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    # TEXTS[0] twice: one duplicate
    (data / "a.txt").write_text("\n\n".join([*TEXTS[:15], TEXTS[0]]), encoding="utf-8")
    lines = [json.dumps({"text": text, "tags": ["seva"]}) for text in TEXTS[15:]] + ["{broken"]
    (data / "b.jsonl").write_text("\n".join(lines + [json.dumps(c) for c in CHATS]) + "\n", encoding="utf-8")
    manifest = directory / "m.toml"
    manifest.write_text(
        "[backbone]\n"
        'config = { architecture = "gpt2", n_layer = 1, n_embd = 8, n_head = 1, vocab_size = 400 }\n'
        f'{extra}\n[data]\ntrain = ["data"]\nmax_length = {max_length}\neval_fraction = {eval_fraction}\n',
        encoding="utf-8",
    )
    return manifest


def all_rows(data) -> dict[str, torch.Tensor]:
    return data.batch(list(range(len(data))))


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        f"{split}.{name}": (directory / f"{split}.{name}").read_bytes()
        for split in ("train", "eval")
        for name in SPLIT_FILES
    }


@pytest.mark.parametrize("eval_fraction", [0.2, 0.001])  # 0.001: the split moves one record across
def test_prepared_rows_are_the_rows_prepare_data_packs_in_memory(tmp_path, eval_fraction):
    manifest = load_manifest(write_corpus(tmp_path, eval_fraction=eval_fraction))

    prepare(manifest, tmp_path / "prepared", refs=REFS)
    prepared = open_prepared(tmp_path / "prepared")
    records = read_data(manifest)
    train, evaluation, report = prepare_data(manifest, prepared.tokenizer, REFS, records=records)

    assert train_tokenizer(records.texts, 400).get_vocab() == prepared.tokenizer.get_vocab()
    assert len(evaluation) >= 1 and len(prepared.eval) == len(evaluation)
    for memory, mapped in ((train, prepared.train), (evaluation, prepared.eval)):
        expected, got = all_rows(memory), all_rows(mapped)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected)
        assert mapped.tokens == memory.tokens
    assert prepared.report.summary() == report.summary()  # 1 duplicate, 1 malformed, 4 conversations
    assert prepared.report.problems == report.problems
    assert prepared.report.conversations == 4 and not prepared.report.conversations_dropped["too_long"]
    assert prepared.meta["dtype"] == "uint16"


def test_chunked_and_parallel_preparation_writes_the_same_bytes(tmp_path, monkeypatch):
    manifest = load_manifest(write_corpus(tmp_path))
    prepare(manifest, tmp_path / "whole", refs=REFS)

    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 200)  # many chunks
    monkeypatch.setattr(prepare_module, "POOL_BYTES", 0)  # cleaned by a pool of processes
    prepare(manifest, tmp_path / "chunked", refs=REFS)

    assert files_of(tmp_path / "whole") == files_of(tmp_path / "chunked")
    assert not list((tmp_path / "chunked").glob("*.chats"))  # the conversations' rows waited on disk


@pytest.mark.parametrize("pool", [False, True])
def test_a_held_out_file_is_prepared_as_in_memory_without_training_text(tmp_path, monkeypatch, pool):
    # data.eval: its duplicates of training text and its too-short records are dropped, counted
    # alike whether the main process or a pool of cleaning processes sorts the records.
    path = write_corpus(tmp_path)
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    texts = [TEXTS[3], "too short", TEXTS[3].upper(), TEXTS[20], "A new verse on the river's silt, held out."]
    (heldout / "h.txt").write_text("\n\n".join(texts), encoding="utf-8")
    path.write_text(path.read_text().replace('train = ["data"]', 'train = ["data"]\neval = ["heldout"]'))
    manifest = load_manifest(path)
    if pool:
        monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 200)
        monkeypatch.setattr(prepare_module, "POOL_BYTES", 0)

    prepare(manifest, tmp_path / "prepared", refs=REFS)
    prepared = open_prepared(tmp_path / "prepared")
    records = read_data(manifest)
    train, evaluation, report = prepare_data(manifest, prepared.tokenizer, REFS, records=records)

    assert len(records.eval) == 2  # the upper-cased verse and the new one
    for memory, mapped in ((train, prepared.train), (evaluation, prepared.eval)):
        expected, got = all_rows(memory), all_rows(mapped)
        assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert prepared.report.summary() == report.summary()
    assert prepared.report.dropped == report.dropped and report.dropped["duplicate"] == 3


def test_a_cleaning_process_that_dies_leaves_the_same_bytes_and_a_warning(tmp_path, monkeypatch, caplog):
    manifest = load_manifest(write_corpus(tmp_path))
    prepare(manifest, tmp_path / "whole", refs=REFS)

    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 200)
    monkeypatch.setattr(prepare_module, "POOL_BYTES", 0)
    monkeypatch.setattr(prepare_module, "clean_chunk", clean_or_die)  # every worker dies at once
    prepare(manifest, tmp_path / "chunked", refs=REFS)

    assert files_of(tmp_path / "whole") == files_of(tmp_path / "chunked")
    assert "a cleaning process died; cleaning the rest of the data in this process" in caplog.text


def test_train_reuses_the_cache_and_reads_the_same_tokens_in_the_same_order(tmp_path):
    manifest = load_manifest(write_corpus(tmp_path))

    first = prepared_data(manifest, refs=REFS)
    second = prepared_data(manifest, refs=REFS)

    assert (first.reused, second.reused) == (False, True)
    assert first.directory == second.directory and first.directory.parent == cache_root() / "prepared"
    assert str(first.directory).startswith(str(tmp_path.parent))  # the test cache, not the user's
    windows = Windows(len(second.train), batch_size=2, grad_accum=2, seed=3)
    for step in range(windows.steps_per_epoch + 1):
        for rows in windows.micro_batches(step):
            a, b = first.train.batch(rows), second.train.batch(rows)
            assert all(torch.equal(a[key], b[key]) for key in a)
    fresh = tmp_path / "again"
    prepare(manifest, fresh, refs=REFS)
    assert files_of(fresh) == files_of(first.directory)


def test_a_changed_file_or_setting_prepares_again_and_says_why(tmp_path):
    path = write_corpus(tmp_path)
    first = prepared_data(load_manifest(path), refs=REFS)
    said = []

    class Console:
        def print(self, text, **options):
            said.append(text)

    with (tmp_path / "data" / "a.txt").open("a", encoding="utf-8") as file:
        file.write("\n\nAhimsa is the refusal to harm, in deed, in word and in thought.\n")
    second = prepared_data(load_manifest(path), refs=REFS, console=Console())
    path.write_text(path.read_text().replace("eval_fraction = 0.2", "eval_fraction = 0.3"))
    third = prepared_data(load_manifest(path), refs=REFS, console=Console())

    assert len({first.directory, second.directory, third.directory}) == 3
    assert f"{(tmp_path / 'data' / 'a.txt').resolve()} changed" in said[0]
    assert "eval_fraction changed (0.2 -> 0.3)" in said[4]
    assert second.report.records_kept == first.report.records_kept + 1


def test_a_resumed_run_keeps_its_tokenizer(tmp_path):
    manifest = load_manifest(write_corpus(tmp_path))
    fresh = prepared_data(manifest, refs=REFS)

    same = prepared_data(manifest, refs=REFS, tokenizer=fresh.tokenizer)
    other = train_tokenizer(TEXTS[:5], 300)
    apart = prepared_data(manifest, refs=REFS, tokenizer=other)

    assert same.directory == fresh.directory and same.reused
    assert apart.directory != fresh.directory
    expected = prepare_data(manifest, other, REFS)[0]
    assert torch.equal(all_rows(apart.train)["input_ids"], expected.input_ids)


def test_ids_are_stored_in_the_smallest_type_that_holds_the_vocabulary():
    assert [id_dtype(n).name for n in (256, 257, 65536, 65537)] == ["uint8", "uint16", "uint16", "uint32"]


def test_the_tokenizer_learns_from_at_most_max_training_chars(tmp_path):
    path = write_corpus(tmp_path, extra="tokenizer = { train = true, max_training_chars = 300 }")
    manifest = load_manifest(path)
    prepared = prepared_data(manifest)

    texts = read_data(manifest).texts
    sample, given = [], 0
    for item in texts:
        if given >= 300:
            break
        sample.append(item)
        given += len(item)
    assert len(sample) < len(texts)
    assert prepared.tokenizer.get_vocab() == train_tokenizer(sample, 400).get_vocab()
    assert prepared.tokenizer.get_vocab() != train_tokenizer(texts, 400).get_vocab()


def test_eval_tokens_caps_the_rows_of_every_evaluation_with_one_fixed_draw(tmp_path):
    manifest = load_manifest(write_corpus(tmp_path, max_length=8, eval_fraction=0.5))
    data = prepared_data(manifest).eval

    capped = eval_rows(data, max_tokens=20, max_length=8, seed=0)
    again = eval_rows(data, max_tokens=20, max_length=8, seed=0)

    assert len(data) > 3 and len(capped) == 3  # ceil(20 / 8)
    assert capped.rows == again.rows == sorted(capped.rows)
    assert torch.equal(capped.batch([1])["input_ids"], data.batch([capped.rows[1]])["input_ids"])
    assert eval_rows(data, max_tokens=0, max_length=8, seed=0) is data
    assert eval_rows(data, max_tokens=10**6, max_length=8, seed=0) is data
    assert eval_rows(None, max_tokens=0, max_length=8, seed=0) is None  # nothing held out


def test_dharma_prepare_writes_a_directory_train_can_name(tmp_path):
    manifest = write_corpus(tmp_path)
    target = tmp_path / "prepared"

    first = run_dharma(None, "prepare", str(manifest), "-o", str(target))
    again = run_dharma(None, "prepare", str(manifest), "-o", str(target), "--json")
    taken = run_dharma(None, "prepare", str(manifest), "-o", str(tmp_path / "data"))

    assert first.returncode == 0, first.stderr
    assert "train: " in first.stdout and f"prepared data: {target}" in first.stdout
    assert json.loads(again.stdout)["reused"] is True
    assert taken.returncode == 2
    assert "is not a prepared data directory" in taken.stderr and "Traceback" not in taken.stderr
    data = open_prepared(target)
    assert np.asarray(data.train.ids).dtype == np.uint16 and len(data.train) > 0


def test_train_refuses_a_prepared_directory_made_for_another_max_length(tmp_path):
    manifest = load_manifest(write_corpus(tmp_path, max_length=45))
    prepare(manifest, tmp_path / "prepared", inputs={})
    other = load_manifest(write_corpus(tmp_path / "other", max_length=16))

    with pytest.raises(DharmaError, match="prepared with max_length 45, the manifest asks for 16"):
        prepared_data(other, paths=[str(tmp_path / "prepared")])


def test_a_preparation_killed_halfway_leaves_nothing_the_next_one_keeps(tmp_path):
    manifest = load_manifest(write_corpus(tmp_path))
    abandoned = cache_root() / "prepared" / "0123abcd.tmp-999999999"  # no such process
    abandoned.mkdir(parents=True)
    (abandoned / "train.ids").write_bytes(b"\0" * 64)

    data = prepared_data(manifest, refs=REFS)

    assert not abandoned.exists()
    assert not list(data.directory.parent.glob(f"{data.directory.name}.tmp-*"))


def test_the_tokenizer_is_used_from_one_thread_while_preparing(tmp_path, monkeypatch):
    # A Rust tokenizer's settings are shared (encode_special_tokens): texts and conversations
    # encoded on two threads at once could read role markers as text. Each split gets its own
    # tokenizing thread; the Thread objects are kept, since an ident can be reused by the next.
    import itertools
    import threading

    from dharma_kernel.data.chat import ChatRows
    from dharma_kernel.data.packing import TextStream

    calls: list[tuple[str, threading.Thread]] = []

    def on_thread(kind, method):
        def call(self, *args, **kwargs):
            calls.append((kind, threading.current_thread()))
            return method(self, *args, **kwargs)

        return call

    monkeypatch.setattr(TextStream, "tokenize", on_thread("texts", TextStream.tokenize))
    monkeypatch.setattr(ChatRows, "add", on_thread("conversations", ChatRows.add))
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 200)  # texts and conversations in many chunks
    manifest = load_manifest(write_corpus(tmp_path))
    prepare(manifest, tmp_path / "prepared", refs=REFS)

    threads = [thread for _, thread in calls]
    runs = [thread for thread, _ in itertools.groupby(threads)]
    assert {kind for kind, _ in calls} == {"texts", "conversations"}
    assert all(thread.name.startswith("dharma-tokenize") for thread in threads)
    assert len(runs) == len(set(runs)) <= 2  # one thread per split, never two interleaved
    kinds_by_thread = [{kind for kind, thread in calls if thread is run} for run in runs]
    assert {"texts", "conversations"} in kinds_by_thread


def test_spilled_pieces_come_back_as_they_went_in(tmp_path):
    from dharma_kernel.data.packing import Piece
    from dharma_kernel.data.shards import SpilledPieces

    rng = np.random.default_rng(0)
    pieces = [
        Piece(rng.integers(0, 400, size), rng.random(size) < 0.5, rng.random(size) < 0.9,
              rng.integers(-1, 2, (size, 3)).astype(np.int8))  # fmt: skip
        for size in (5, 0, 13, 8)
    ]
    with SpilledPieces(tmp_path / "x.chats", id_dtype(400)) as spilled:
        for piece in pieces:
            spilled.add(piece)
        back = list(spilled.pieces())
        with pytest.raises(ValueError, match="token ids outside"):
            spilled.add(Piece(np.array([70_000]), np.ones(1, bool), np.ones(1, bool), None))
    kept = [piece for piece in pieces if len(piece.ids)]
    assert len(back) == 3 and not (tmp_path / "x.chats").exists()
    for a, b in zip(kept, back, strict=True):
        assert [x.tolist() for x in (a.ids, a.trained, a.real, a.concepts)] == [
            x.tolist() for x in (b.ids, b.trained, b.real, b.concepts)
        ]
