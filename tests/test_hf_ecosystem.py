"""A saved Dharma directory in the Hugging Face ecosystem: Auto classes, generate(), the card, push.

Never contacts a hub: pushing is checked against a mocked HfApi, with sockets refused.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
from threading import Thread

import pytest
import torch
from trainkit import SENTENCES, write_manifest
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

import dharma_kernel
from dharma_kernel import checkpoint, padding
from dharma_kernel.assemble import build, plan_manifest
from dharma_kernel.data.tokenizer import END_OF_TEXT, train_tokenizer
from dharma_kernel.manifest import parse_manifest
from dharma_kernel.testing import perturb

STEP = 4
METRICS = [
    {"step": 0, "eval_loss": 6.0, "eval_ppl": 403.43, "eval_tokens": 90.0},
    *({"step": s, "loss": 6.5 - 0.1 * s, "lm": 6.4 - 0.1 * s, "tokens": 256.0} for s in range(1, 7)),
    {"step": 4, "eval_loss": 5.5, "eval_ppl": 244.69, "eval_tokens": 90.0},
    {"step": 6, "eval_loss": 5.25, "eval_ppl": 190.57, "eval_tokens": 90.0},  # after the checkpoint
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A routed model (2 modules at layers 0 and 1), a trained tokenizer, and their manifest's directory."""
    root = tmp_path_factory.mktemp("hf")
    _, plan = plan_manifest(write_manifest(root, dropout=0.0))
    model = build(plan, seed=0)
    perturb(model.stacks, seed=1, std=0.1)
    tokenizer = train_tokenizer(SENTENCES * 3, vocab_size=320, min_frequency=1, model_max_length=64)
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(model.config.text_config, name, 0)
        setattr(model.generation_config, name, 0)
    return root, model, tokenizer


@pytest.fixture(scope="module")
def saved(built):
    """The built model and its tokenizer, saved as step 4 of a run."""
    root, model, tokenizer = built
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    (run / "eval_results.json").write_text(json.dumps({"eval_loss": 5.5, "eval_samples": 12}))  # HF Trainer's
    directory = checkpoint.save(model, run / "checkpoints" / f"step-{STEP:08d}", tokenizer)
    return directory


@pytest.fixture(scope="module")
def loaded(saved):
    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    return model, AutoTokenizer.from_pretrained(saved)  # saved to pad on the left: no setting needed


def prompts(tokenizer, texts=("Karma yoga is work", "The river")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def generate(model, batch, **kwargs):
    with torch.no_grad():
        return model.generate(**batch, pad_token_id=0, **kwargs)


def test_a_saved_tokenizer_pads_left_so_a_batch_generates_what_each_prompt_gives_alone(
    built, loaded, tmp_path
):
    model, tokenizer = loaded
    assert (tokenizer.padding_side, tokenizer.pad_token) == ("left", END_OF_TEXT)
    texts = ["Karma yoga is work offered without", "The river", "Seva means service given freely, a gift"]
    batch = prompts(tokenizer, texts)
    assert batch["attention_mask"][1, 0] == 0  # the short prompt is padded, on the left
    together = generate(model, batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:]
    for row, text in enumerate(texts):
        alone = prompts(tokenizer, [text])
        expected = generate(model, alone, max_new_tokens=8, do_sample=False)[0, alone["input_ids"].shape[1]:]
        assert together[row].tolist() == expected.tolist(), text

    # A tokenizer that pads on the right and has no pad token (a backbone's, say) is saved
    # generation-ready too, and the object given is left as it was.
    own = copy.deepcopy(built[2])
    own.padding_side, own.pad_token = "right", None
    padding.save_tokenizer(own, tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (reloaded.padding_side, reloaded.pad_token) == ("left", END_OF_TEXT)
    assert (own.padding_side, own.pad_token) == ("right", None)


def test_auto_classes_load_a_saved_directory(built, saved, loaded):
    model, _ = loaded
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(ids).logits[0, -1, :4].tolist()
        as_saved = built[1](ids).logits[0, -1, :4].tolist()
    code = (
        "import sys, json\n"
        "import dharma_kernel\n"
        "light = 'torch' not in sys.modules\n"  # importing the package stays cheap
        "import torch\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        f"d = {str(saved)!r}\n"
        "config, tok = AutoConfig.from_pretrained(d), AutoTokenizer.from_pretrained(d)\n"
        "model = AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "logits = model(torch.tensor([[5, 6, 7, 8]])).logits[0, -1, :4].tolist()\n"
        "print(json.dumps([light, type(config).__name__, type(model).__name__, model.module_refs,\n"
        "                  tok.decode(tok('Dharma is duty')['input_ids']), logits]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    light, config, name, refs, text, logits = json.loads(result.stdout.strip().splitlines()[-1])
    assert light
    assert (config, name, refs) == ("DharmaConfig", "DharmaModel", ["paths.dharma", "darshanas.vedanta"])
    assert text == "Dharma is duty"
    assert logits == pytest.approx(expected, abs=1e-6)
    assert logits == pytest.approx(as_saved, abs=1e-6)  # the model that was saved gives them too


def test_sampling_honours_seed_temperature_top_k_and_top_p(loaded):
    model, tokenizer = loaded
    batch = prompts(tokenizer)
    sample = {"do_sample": True, "max_new_tokens": 8, "temperature": 0.7, "top_k": 5, "top_p": 0.9}

    def sampled(seed, **extra):
        torch.manual_seed(seed)
        return generate(model, batch, **sample, **extra)

    first = sampled(0)
    assert first.shape == (2, batch["input_ids"].shape[1] + 8)
    assert torch.equal(first, sampled(0))
    assert torch.equal(first, sampled(0, use_cache=False))  # the module cache changes nothing
    # top_k=1 leaves one candidate: sampling is greedy search
    torch.manual_seed(1)
    greedy_by_sampling = generate(model, batch, do_sample=True, top_k=1, max_new_tokens=8)
    assert torch.equal(greedy_by_sampling, generate(model, batch, do_sample=False, max_new_tokens=8))

    torch.manual_seed(0)
    out = generate(
        model, batch, **sample, output_scores=True, output_logits=True, return_dict_in_generate=True
    )
    for raw, processed in zip(out.logits, out.scores, strict=True):
        kept = torch.isfinite(processed)
        assert (kept.sum(-1) >= 1).all() and (kept.sum(-1) <= 5).all()  # top_k
        torch.testing.assert_close(processed[kept], raw[kept] / 0.7)  # temperature
        probs = torch.softmax(raw / 0.7, dim=-1)
        for row in range(raw.shape[0]):
            mass = probs[row][kept[row]]
            assert mass.sum() - mass.min() < 0.9 + 1e-6  # top_p: no smaller nucleus would do


def test_beam_search_reorders_routed_module_caches(loaded):
    model, tokenizer = loaded
    batch = prompts(tokenizer)
    beams = {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 7, "do_sample": False}
    beams |= {"output_scores": True, "return_dict_in_generate": True, "length_penalty": 0.0}
    cached = generate(model, batch, use_cache=True, **beams)
    uncached = generate(model, batch, use_cache=False, **beams)
    assert cached.sequences.shape[0] == 4
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=0, atol=1e-5)
    # some beam changed parent on the way, so a cache that did not follow would have shown
    assert any(len(set(row[row >= 0].tolist())) > 1 for row in cached.beam_indices)


class AfterNewTokens(StoppingCriteria):
    def __init__(self, start: int, count: int) -> None:
        self.stop_at = start + count

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.stop_at, dtype=torch.bool)


def test_stopping_by_length_eos_criteria_and_stop_strings(loaded):
    model, tokenizer = loaded
    batch = prompts(tokenizer, ["Dharma is the duty"])
    start = batch["input_ids"].shape[1]
    full = generate(model, batch, max_new_tokens=12, do_sample=False)
    new = full[0, start:].tolist()
    assert len(new) == 12  # max_new_tokens (no end-of-text on the way)
    # eos: stops right after the first time the chosen token is produced
    eos = new[3]
    stopped = generate(model, batch, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    assert stopped[0, start:].tolist() == new[: new.index(eos) + 1]
    # a StoppingCriteria of our own
    criteria = StoppingCriteriaList([AfterNewTokens(start, 3)])
    by_criteria = generate(model, batch, max_new_tokens=12, do_sample=False, stopping_criteria=criteria)
    assert by_criteria[0, start:].tolist() == new[:3]
    # stop strings: text ending where the string first completes
    text = tokenizer.decode(new)
    stop = next(piece.strip() for piece in map(tokenizer.decode, new[2:]) if piece.strip())
    cut = generate(model, batch, max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    cut_text = tokenizer.decode(cut[0, start:])
    assert cut_text.endswith(stop) and text.startswith(cut_text) and len(cut_text) < len(text)
    assert stop not in cut_text[:-1]


def test_streaming_gives_the_generated_text(loaded):
    model, tokenizer = loaded
    batch = prompts(tokenizer, ["Seva means service"])
    start = batch["input_ids"].shape[1]
    expected = tokenizer.decode(generate(model, batch, max_new_tokens=16, do_sample=False)[0, start:])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    kwargs = {**batch, "max_new_tokens": 16, "do_sample": False, "pad_token_id": 0, "streamer": streamer}
    worker = Thread(target=model.generate, kwargs=kwargs)
    worker.start()
    chunks = list(streamer)
    worker.join()
    assert len(chunks) > 1  # it arrived in pieces, as generated
    assert "".join(chunks) == expected and expected


def card_toml(card: str) -> str:
    return re.search(r"```toml\n(.*?)```", card, re.S).group(1)


def test_the_card_lists_manifest_plugins_data_metrics_and_how_to_reproduce(saved):
    card = (saved / "README.md").read_text()
    config = json.loads((saved / "config.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "\n# tiny\n" in card
    assert "with 2 modules after blocks [0, 1], routed, top_k 1" in card
    for entry in config["lock"]:  # plugins and versions, from the lock
        cells = [entry[key] for key in ("ref", "kind", "distribution", "version", "module_api")]
        assert "| " + " | ".join(cells) + " |" in card
    # the manifest, as TOML that reads back to the very manifest the model was built from
    assert parse_manifest(card_toml(card)).to_dict() == config["manifest"]
    assert "- train: data\n- eval: 0.1 of the training records, drawn by hash\n- max_length: 32" in card
    # metrics of the run up to this checkpoint's step, not after it
    assert "up to step 4: 4 steps, 1,024 tokens; last loss 6.1000 (lm 6.0000)" in card
    assert "| 0 | 6.0000 | 403.4300 |\n| 4 | 5.5000 | 244.6900 |\n\n" in card
    assert "| 6 |" not in card
    assert "Best eval perplexity 244.6900 at step 4." in card
    assert (
        "| eval_results.json | value |\n| --- | --- |\n| eval_loss | 5.5000 |\n| eval_samples | 12 |" in card
    )
    pins = (
        f"dharma-kernel=={dharma_kernel.__version__} dharma-plugin-dharma==0.1.0 dharma-plugin-vedanta==0.1.0"
    )
    assert f"pip install {pins}\ndharma train manifest.toml" in card


def test_a_model_not_from_a_run_says_it_has_no_metrics(tmp_path, loaded):
    model, _ = loaded
    directory = checkpoint.save(model, tmp_path / "elsewhere")
    card = (directory / "README.md").read_text()
    assert "None recorded with this model (it was not saved from a training run)." in card
    assert parse_manifest(card_toml(card)).to_dict() == model.config.manifest
    # save_pretrained (transformers' Trainer saves through it) writes the same card
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "README.md").read_text() == card


def test_push_to_hub_uploads_the_files_and_the_same_card(saved, loaded, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    model, _ = loaded
    uploaded: dict[str, bytes] = {}
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs.get("private"))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls["commit"] = (repo_id, kwargs.get("commit_message"))
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:  # the staging directory goes after this call
                uploaded[op.path_in_repo] = f.read()
        return "committed"

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    assert model.push_to_hub("someone/tiny", private=True, commit_message="first", tags=["x"]) == "committed"
    assert calls == {"repo": ("someone/tiny", True), "commit": ("someone/tiny", "first")}
    assert sorted(uploaded) == [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    saved_card = (saved / "README.md").read_text()
    pushed_card = uploaded["README.md"].decode()
    # the same card, metrics included; only the loading lines name the repository
    expected = saved_card.replace('from_pretrained("tiny")', 'from_pretrained("someone/tiny")')
    assert pushed_card == expected.replace("- paths\n---", "- paths\n- x\n---")  # and the tags given
    assert uploaded["tokenizer.json"] == (saved / "tokenizer.json").read_bytes()


def test_a_card_that_cannot_be_made_never_costs_the_save(tmp_path, loaded, monkeypatch):
    from dharma_kernel import hub

    model, _ = loaded

    def broken(*args, **kwargs):
        raise ValueError("no card today")

    monkeypatch.setattr(hub, "model_card", broken)
    with pytest.warns(UserWarning, match="model card incomplete: ValueError: no card today"):
        directory = checkpoint.save(model, tmp_path / "model")
    assert (directory / "model.safetensors").exists()
    assert "see config.json for its manifest and plugins" in (directory / "README.md").read_text()
