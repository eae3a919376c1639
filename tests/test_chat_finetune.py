"""Chat end to end: a tiny foundation fine-tuned on conversations (assistant-only loss); `dharma chat`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from trainkit import write_manifest
from typer.testing import CliRunner

from dharma_kernel.cli import app
from dharma_kernel.data import pack, read_records

# Short answers a 2-layer, 64-wide model can learn in a few dozen steps.
FACTS = [
    ("dharma", "duty"), ("karma", "action"), ("moksha", "freedom"), ("seva", "service"),
    ("ahimsa", "kindness"), ("bhakti", "love"), ("jnana", "knowledge"), ("shanti", "peace"),
    ("satya", "truth"), ("tapas", "effort"), ("atman", "the self"), ("guru", "a teacher"),
]  # fmt: skip
HELD_OUT = [("yoga", "union"), ("prana", "breath"), ("maya", "appearance")]
SYSTEM = "Answer in one line."
MAX_NEW = 24  # with the foundation's 64 positions, a prompt may hold 40 tokens


def conversation(word: str, meaning: str, system: bool) -> dict:
    turns = [
        {"role": "user", "content": f"What is {word}?"},
        {"role": "assistant", "content": f"{word.capitalize()} means {meaning}."},
    ]
    return {"messages": ([{"role": "system", "content": SYSTEM}] if system else []) + turns}


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def chatbot(tmp_path_factory) -> Path:
    """A foundation trained 6 steps on trainkit's text, fine-tuned 60 steps on 12 conversations."""
    root = tmp_path_factory.mktemp("chat")
    invoke("train", str(write_manifest(root, train={"max_steps": 6, "eval_every": 6})))
    chats = [conversation(word, meaning, n % 3 == 0) for n, (word, meaning) in enumerate(FACTS)]
    write_jsonl(root / "chats.jsonl", chats)
    write_jsonl(root / "held.jsonl", [conversation(word, meaning, False) for word, meaning in HELD_OUT])
    invoke(
        "finetune", str(root / "run"), "--data", str(root / "chats.jsonl"), "-o", str(root / "chatbot"),
        "--max-steps", "60", "--batch-size", "4", "--learning-rate", "1e-2", "--max-length", "64",
    )  # fmt: skip
    return root


def assistant_loss(directory: Path, records) -> float:
    from dharma_kernel.application import load_application
    from dharma_kernel.evaluate import lm_totals

    model, tokenizer = load_application(directory)
    total, count = lm_totals(model, pack(records, tokenizer, 64), batch_size=8)
    return total / count


def test_finetuning_on_conversations_lowers_the_loss_on_assistant_tokens(chatbot):
    records = read_records([chatbot / "chats.jsonl"])
    before, after = assistant_loss(chatbot / "run", records), assistant_loss(chatbot / "chatbot", records)
    # Measured: 5.63 before, 0.33 after.
    assert before > 5.0 and after < 1.0, (before, after)
    # Held-out conversations: new words in the same frame ("What is ...?", "... means ...", the
    # end marker). Measured: 5.70 before, 4.81 after.
    held = read_records([chatbot / "held.jsonl"])
    before, after = assistant_loss(chatbot / "run", held), assistant_loss(chatbot / "chatbot", held)
    assert after < 0.9 * before, (before, after)


def test_only_assistant_tokens_carry_loss_and_gradient(chatbot):
    from dharma_kernel.application import load_application

    model, tokenizer = load_application(chatbot / "chatbot")
    records = read_records([chatbot / "chats.jsonl"])
    packed = pack(records, tokenizer, 64)
    batch = packed.batch(list(range(len(packed))))
    trained = batch["input_ids"][batch["labels"] != -100].tolist()
    answers = "".join(f"{word.capitalize()} means {meaning}.<|endoftext|>" for word, meaning in FACTS)
    assert tokenizer.decode(trained) == answers

    model.eval()
    out = model(**batch, use_cache=False)
    out.logits.retain_grad()
    out.losses["lm"].backward()
    by_hand = F.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )
    assert abs(out.losses["lm"].item() - by_hand.item()) < 1e-5
    # The logits at a position are trained only when the next token is the assistant's.
    predicts_answer = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_answer[:, :-1] = batch["labels"][:, 1:] != -100
    grad = out.logits.grad.abs().sum(-1)
    assert (grad[~predicts_answer] == 0).all() and (grad[predicts_answer] > 0).all()


def test_dharma_chat_answers_each_line_and_keeps_history_within_the_context(chatbot):
    from transformers import AutoTokenizer

    lines = ["What is seva?", "why " * 30, "What is karma?", "What is dharma?", "/exit", "What is guru?"]
    env = {**os.environ, "NO_COLOR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dharma_kernel", "chat", str(chatbot / "chatbot"), "--system", SYSTEM,
         "--max-new-tokens", str(MAX_NEW), "--temperature", "0", "--show-prompt"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) == 3  # seva, karma, dharma; the long line is refused, nothing after /exit
    # Fine-tuning taught the frame of an answer and where it ends (not every fact, in 60 steps).
    assert all(re.fullmatch(r"[A-Z][a-z]+ means [a-z ]+\.", reply) for reply in replies), replies
    ends = re.findall(r"reply: \d+ tokens, (.*)", result.stderr)
    assert ends == ["ended by the end marker"] * 3

    budget = 64 - MAX_NEW
    assert re.search(
        rf"error: that message alone is \d+ tokens; .* context of 64 leaves {budget}\.", result.stderr
    )
    prompts = re.findall(
        r"prompt: (\d+) tokens, (\d+) of (\d+) messages[^\n]*\n(.*?)\n---\n", result.stderr, re.S
    )
    assert len(prompts) == 3 and all(int(tokens) <= budget for tokens, _, _, _ in prompts)

    # Rebuild the conversation and check the rule: the system message and as many of the
    # latest exchanges as fit in the budget, the oldest dropped first.
    tokenizer = AutoTokenizer.from_pretrained(chatbot / "chatbot")
    history = [{"role": "system", "content": SYSTEM}]
    questions = lines[:1] + lines[2:4]
    for (tokens, kept_count, total, text), question, reply in zip(prompts, questions, replies, strict=True):
        history.append({"role": "user", "content": question})
        assert int(total) == len(history)
        kept = history[:1] + history[len(history) - int(kept_count) + 1 :]
        ids = tokenizer.apply_chat_template(kept, add_generation_prompt=True)["input_ids"]
        assert len(ids) == int(tokens) and tokenizer.decode(ids) == text
        if len(kept) < len(history):  # one more exchange would not have fit
            wider = history[:1] + history[len(history) - len(kept) - 1 :]
            assert len(tokenizer.apply_chat_template(wider, add_generation_prompt=True)["input_ids"]) > budget
        history = kept + [{"role": "assistant", "content": reply}]
    assert [int(kept) < int(total) for _, kept, total, _ in prompts][:2] == [False, True]
    assert "seva" not in prompts[2][3] and "What is dharma?" in prompts[2][3]


def test_dharma_chat_refuses_a_max_new_tokens_that_leaves_no_room(chatbot):
    result = subprocess.run(
        [sys.executable, "-m", "dharma_kernel", "chat", str(chatbot / "chatbot"), "--max-new-tokens", "60"],
        input="hello\n",
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--max-new-tokens 60 leaves 4 tokens of the model's context of 64" in result.stderr
