"""Conversation data: the chat template, assistant-only labels, packing, fitting, bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dharma_kernel.data import DataReport, Record, clean_records, pack, read_records, render_messages
from dharma_kernel.data.chat import (
    CHAT_TEMPLATE,
    MARKERS,
    encode_chat,
    ensure_chat_template,
    fit_turns,
    stop_token_ids,
)
from dharma_kernel.data.tokenizer import train_tokenizer
from dharma_kernel.errors import DharmaError

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
TEXTS = ["What is dharma? Dharma is duty. What is karma? Karma is action."] * 5
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is dharma?"},
    {"role": "assistant", "content": "Dharma is duty."},
    {"role": "user", "content": "And karma?"},
    {"role": "assistant", "content": "Karma is action."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def conversation_record(turns, index=1) -> Record:
    return Record(render_messages(turns), messages=turns, index=index)


def test_the_template_renders_roles_markers_and_the_end_marker(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<|system|>\nBe brief.\n<|user|>\nWhat is dharma?\n<|assistant|>\nDharma is duty.<|endoftext|>"
        "<|user|>\nAnd karma?\n<|assistant|>\nKarma is action.<|endoftext|>"
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nAnd karma?\n<|assistant|>\n")


def test_only_the_assistants_words_and_end_marker_carry_labels(tokenizer):
    encoded = encode_chat(tokenizer, CONVERSATION)
    tokens = tokenizer.convert_ids_to_tokens(encoded.ids)
    trained = [token for token, label in zip(tokens, encoded.labels, strict=True) if label != -100]
    assert trained == [
        "Dharma",
        "Ġis",
        "Ġduty",
        ".",
        "<|endoftext|>",
        "Karma",
        "Ġis",
        "Ġaction",
        ".",
        "<|endoftext|>",
    ]
    # Every label is -100 or the token itself; everything up to the first answer is -100.
    assert all(label in (-100, token) for label, token in zip(encoded.labels, encoded.ids, strict=True))
    first = tokens.index("Dharma")
    assert tokens[first - 2 : first] == ["<|assistant|>", "Ċ"]
    assert set(encoded.labels[:first]) == {-100}
    assert tokens[first + 5 : first + 8] == ["<|user|>", "Ċ", "A"] and set(
        encoded.labels[first + 5 : first + 15]
    ) == {-100}
    # transformers' own assistant mask (from the template's {% generation %} block) agrees.
    hf = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert hf["input_ids"] == encoded.ids
    assert hf["assistant_masks"] == [int(label != -100) for label in encoded.labels]


def test_a_trained_tokenizer_has_the_markers_as_single_tokens_and_round_trips(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(marker) for marker in MARKERS]
    assert ids == [1, 2, 3] and tokenizer.eos_token_id == 0
    encoded = encode_chat(tokenizer, CONVERSATION)
    assert tokenizer.decode(encoded.ids) == encoded.text
    assert stop_token_ids(tokenizer) == [0]


def test_a_tokenizer_without_markers_or_template_gets_ours_and_spells_markers_as_text():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TEXTS, trainer)
    plain = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    assert plain.chat_template is None

    ensure_chat_template(plain)

    assert plain.chat_template == CHAT_TEMPLATE
    encoded = encode_chat(plain, CONVERSATION)
    assert plain.decode(encoded.ids) == encoded.text
    assert plain.decode(
        [i for i, label in zip(encoded.ids, encoded.labels, strict=True) if label != -100]
    ) == ("Dharma is duty.<|endoftext|>Karma is action.<|endoftext|>")


def test_the_template_is_saved_and_transformers_alone_reproduces_the_ids(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)

    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.apply_chat_template(CONVERSATION)["input_ids"] == encode_chat(tokenizer, CONVERSATION).ids


def test_packing_puts_whole_conversations_in_rows_with_assistant_labels_only(tokenizer):
    short = [{"role": "user", "content": "What is dharma?"}, {"role": "assistant", "content": "Duty."}]
    records = [conversation_record(short), Record("Karma is action. " * 3), conversation_record(CONVERSATION)]
    report = DataReport()

    packed = pack(records, tokenizer, 48, report=report)

    # the text row first, then each conversation in a row of its own (13 + 41 tokens > 48)
    n = len(encode_chat(tokenizer, short))
    assert (n, len(encode_chat(tokenizer, CONVERSATION))) == (13, 41)
    assert packed.input_ids.shape == (3, 48)
    text_row, first, second = packed.labels
    assert (text_row[1:] != -100).sum() > 0
    assert tokenizer.decode(packed.input_ids[1][:n]) == tokenizer.apply_chat_template(short, tokenize=False)
    assert tokenizer.decode(packed.input_ids[1][first != -100]) == "Duty.<|endoftext|>"
    assert (packed.attention_mask[1][n:] == 0).all()
    trained = packed.input_ids[2][second != -100].tolist()
    assert tokenizer.decode(trained) == "Dharma is duty.<|endoftext|>Karma is action.<|endoftext|>"
    assert (report.conversations, report.conversations_truncated, report.conversations_cut) == (2, 0, 0)


def test_short_conversations_share_a_row(tokenizer):
    short = [{"role": "user", "content": "What is dharma?"}, {"role": "assistant", "content": "Duty."}]
    packed = pack([conversation_record(short)] * 3, tokenizer, 40)
    assert packed.input_ids.shape == (1, 40) and int(packed.attention_mask.sum()) == 3 * 13
    assert packed.tokens == 3 * 4  # "D", "uty", ".", the end marker


def test_a_long_conversation_keeps_its_latest_exchanges_and_the_system_message(tokenizer):
    report = DataReport()
    packed = pack([conversation_record(CONVERSATION)], tokenizer, 32, report=report)
    text = tokenizer.decode(packed.input_ids[0][packed.attention_mask[0].bool()])
    assert text == "<|system|>\nBe brief.\n<|user|>\nAnd karma?\n<|assistant|>\nKarma is action.<|endoftext|>"
    assert report.conversations_truncated == 1


def test_a_single_exchange_longer_than_max_length_is_cut_and_one_with_no_answer_left_dropped(tokenizer):
    long_answer = [
        {"role": "user", "content": "What is dharma?"},
        {"role": "assistant", "content": "Duty. " * 30},
    ]
    long_question = [{"role": "user", "content": "Why? " * 40}, {"role": "assistant", "content": "Duty."}]
    spelled = [{"role": "user", "content": "Say <|endoftext|>"}, {"role": "assistant", "content": "No."}]
    report = DataReport()

    records = [conversation_record(t) for t in (long_answer, long_question, spelled)]
    packed = pack(records, tokenizer, 24, report=report)

    assert len(packed) == 1 and bool(packed.attention_mask.all())
    prompt = tokenizer.apply_chat_template(long_answer[:1], add_generation_prompt=True)["input_ids"]
    assert packed.tokens == 24 - len(prompt)  # the rest of the row is the answer's beginning
    assert (report.conversations_cut, report.conversations_dropped) == (
        1,
        {"too_long": 1, "control_token": 1},
    )
    assert report.summary().splitlines()[-1] == (
        "conversations: 3 (loss on assistant turns only); 0 kept only their latest turns, "
        "1 cut at max_length; dropped: 1 too_long, 1 control_token"
    )


def test_fit_turns_drops_the_oldest_exchanges_first_and_keeps_the_system_message():
    turns = [{"role": "system", "content": "s"}] + [
        {"role": role, "content": f"{role}{n}"} for n in range(3) for role in ("user", "assistant")
    ]

    def length(kept):
        return sum(len(turn["content"]) + 1 for turn in kept)

    assert fit_turns(turns, length, 100) == turns
    assert fit_turns(turns, length, 53) == turns
    assert [t["content"] for t in fit_turns(turns, length, 52)] == [
        "s",
        "user1",
        "assistant1",
        "user2",
        "assistant2",
    ]
    assert [t["content"] for t in fit_turns(turns, length, 35)] == ["s", "user2", "assistant2"]
    assert fit_turns(turns, length, 18) is None


def test_concept_labels_follow_tags_and_hits_and_skip_control_tokens(tokenizer):
    from dharma_kernel.concepts import Lexicon

    lexicons = {"paths.dharma": Lexicon(("dharma",)), "paths.karma": Lexicon(("karma",))}
    record = Record("x", messages=CONVERSATION[1:3], tags=())
    packed = pack([record], tokenizer, 24, refs=["paths.dharma", "paths.karma"], lexicons=lexicons)
    ids = packed.input_ids[0].tolist()
    labels = packed.concept_labels[0]
    dharma = tokenizer.convert_ids_to_tokens(ids).index("Ġdharma")
    assert labels[:dharma, 0].tolist() == [-100, 0, 0, 0]  # <|user|> is a control token
    assert (labels[dharma : int(packed.attention_mask.sum()) - 1, 0] != 0).all()  # causal: from the hit on
    assert (labels[:, 1] <= 0).all()  # karma is not named here


BAD = [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
     "message 2 has role 'bot'; roles are system, user, assistant"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     "message 2 (assistant) has empty content"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Anyone?"}]},
     "the conversation has no assistant turn, so nothing to train a chat model on"),
    ({"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}]},
     "message 1 is from the assistant; a conversation starts with a user message "
     "(after an optional system message)"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be kind"},
                   {"role": "assistant", "content": "Hello"}]},
     "message 2 is a system message; only the first message may be one"),
]  # fmt: skip


def test_bad_conversations_are_reported_with_file_and_record_number(tmp_path):
    good = {"messages": CONVERSATION}
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in [good, *(bad for bad, _ in BAD)]))
    report = DataReport()

    records = read_records([path], report=report)

    assert [record.index for record in records] == [1]
    assert report.problems == [(str(path), number, reason) for number, (_, reason) in enumerate(BAD, 2)]
    with pytest.raises(DharmaError) as caught:
        read_records([path], strict=True)
    assert str(caught.value).startswith(
        f"{path}:2: message 2 has role 'bot'; roles are system, user, assistant"
    )


def test_a_conversation_whose_message_cleans_to_nothing_is_dropped_as_empty():
    turns = [{"role": "user", "content": "<br>"}, {"role": "assistant", "content": "Nothing was asked."}]
    report = DataReport()
    assert clean_records([conversation_record(turns)], min_chars=1, report=report) == []
    assert report.dropped["empty"] == 1


def test_the_example_conversations_load_and_pack_without_problems(tokenizer):
    report = DataReport()
    records = clean_records(read_records([EXAMPLES / "conversations.jsonl"], report=report), report=report)
    assert report.problems == [] and len(records) == report.records_read >= 59
    assert all(record.messages for record in records)
    packed = pack(records, tokenizer, 256, report=report)
    assert report.conversations == len(records) and sum(report.conversations_dropped.values()) == 0
    roles = {turn["role"] for record in records for turn in record.messages}
    assert roles == {"system", "user", "assistant"}
    assert packed.tokens > 5000


@pytest.mark.skipif(not SEED.exists(), reason="seed data not present")
def test_the_seed_conversations_load_as_chats():
    path = SEED / "training" / "dharmic_conversations.json"
    report = DataReport()
    records = clean_records(read_records([path], strict=True, report=report), report=report)
    assert len(records) == 7 and all(len(r.messages) == 2 for r in records)
    assert records[0].messages[0] == {"role": "user", "content": "What is dharma?"}
    tokenizer = train_tokenizer([turn["content"] for r in records for turn in r.messages], vocab_size=600)
    packed = pack(records, tokenizer, 400, report=report)
    assert report.conversations == 7 and report.conversations_cut == 0 and len(packed) == 7
    answers = [
        tokenizer.decode(row[labels != -100].tolist())
        for row, labels in zip(packed.input_ids, packed.labels, strict=True)
    ]
    assert answers == [r.messages[1]["content"] + "<|endoftext|>" for r in records]
    assert torch.equal(packed.labels != -100, (packed.labels != -100) & packed.attention_mask.bool())


def test_a_manifest_with_conversations_trains_on_assistant_turns_with_a_templated_tokenizer(tmp_path):
    from dharma_kernel.data import prepare_data, read_data, resolve_tokenizer
    from dharma_kernel.manifest import load_manifest

    chats = [
        {
            "messages": [
                {"role": "user", "content": f"What is {word}?"},
                {"role": "assistant", "content": answer},
            ]
        }
        for word, answer in [
            ("dharma", "Duty and order."),
            ("karma", "Action and its fruit."),
            ("seva", "Service."),
        ]
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chats.jsonl").write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    (tmp_path / "data" / "notes.txt").write_text("Dharma holds the world together; karma is action.")
    manifest = tmp_path / "m.toml"
    manifest.write_text(
        "[backbone]\n"
        'config = { architecture = "gpt2", n_layer = 1, n_embd = 8, n_head = 1, vocab_size = 400 }\n'
        'tokenizer = { train = true, min_frequency = 1 }\n[data]\ntrain = ["data"]\nmax_length = 48\n'
        "eval_fraction = 0.0\nmin_chars = 5\n"
    )
    loaded = load_manifest(manifest)
    data = read_data(loaded)

    tokenizer = resolve_tokenizer(loaded, data.texts)
    train, _, report = prepare_data(loaded, tokenizer, records=data)

    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert "User:" not in "".join(data.texts)  # the tokenizer learns from what the template shows
    assert report.conversations == 3 and len(train) == 2  # the text row, then the three chats in one row
    chat_row = train.input_ids[1][train.labels[1] != -100].tolist()
    assert (
        tokenizer.decode(chat_row)
        == "Duty and order.<|endoftext|>Action and its fruit.<|endoftext|>Service.<|endoftext|>"
    )


def test_conversations_given_a_part_at_a_time_pack_as_all_at_once(tokenizer):
    from dharma_kernel.concepts import Lexicon
    from dharma_kernel.data.chat import ChatRows, pack_conversations
    from dharma_kernel.data.packing import _concat

    short = [{"role": "user", "content": "What is dharma?"}, {"role": "assistant", "content": "Duty."}]
    long = CONVERSATION * 3  # longer than a row: its latest exchanges are kept
    records = [conversation_record(turns, n) for n, turns in enumerate([short, CONVERSATION, short, long,
               short, short, CONVERSATION[1:3], short], 1)]  # fmt: skip
    refs, lexicons = ["paths.dharma"], {"paths.dharma": Lexicon(("dharma",))}
    whole_report, parts_report = DataReport(), DataReport()
    whole = pack_conversations(records, tokenizer, 40, whole_report, refs, lexicons)

    rows = ChatRows(tokenizer, 40, parts_report, refs, lexicons)
    # Parts of 3, 1, 0 and 4 records: rows left open at a part's end are continued by the next.
    parts = [rows.add(records[:3]), rows.add(records[3:4]), rows.add([]), rows.add(records[4:]), rows.close()]

    assert [len(part.input_ids) for part in parts][-1] == 1 and len(whole.input_ids) < len(records)
    joined = _concat(parts)
    for name in ("input_ids", "labels", "attention_mask", "concept_labels"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    assert parts_report.summary() == whole_report.summary() and parts_report.conversations == 8


def test_our_template_written_out_renders_and_spans_as_its_jinja(tokenizer, monkeypatch):
    import random

    from dharma_kernel.data import chat

    rng = random.Random(0)
    pieces = ["karma", " ", "\n", "{{ x }}", "{% if %}", "'", '"', "ā", "  ", "\t", "\\n", "}}", "धर्म"]

    def said(role):
        return {"role": role, "content": "".join(rng.choices(pieces, k=rng.randint(0, 6)))}

    conversations = []
    for n in range(60):
        turns = [said(role) for _ in range(1 + n % 3) for role in ("user", "assistant")]
        conversations.append([said("system")] * (n % 3 == 0) + turns + [said("user")] * (n % 4 == 0))
    written = [chat.assistant_spans(tokenizer, turns) for turns in conversations]
    monkeypatch.setattr(chat, "CHAT_TEMPLATE", "not ours")  # every conversation through the Jinja template
    assert [chat.assistant_spans(tokenizer, turns) for turns in conversations] == written
    assert written[0][1] and all(text.endswith(("\n", tokenizer.eos_token)) for text, _ in written)
