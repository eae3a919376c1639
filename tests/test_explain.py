"""`dharma explain` and `dharma generate --explain`: per token, the modules that fired.

One tiny routed model is trained briefly (LM, concept and routing losses) on short sentences in
which a lexicon word names its module's concept, so that its router tells the concepts apart.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from test_concept_training import one_thread
from test_concepts import word_tokenizer
from test_report import CHROMIUM, chromium

from dharma_kernel.assemble import build_model
from dharma_kernel.checkpoint import save
from dharma_kernel.concepts import label_batch, lexicons_for
from dharma_kernel.errors import DharmaError
from dharma_kernel.explain import explain_generated, explain_text
from dharma_kernel.explain_page import family_colour, rgb
from dharma_kernel.testing import cli_output, run_cli, tiny_backbone_config

REFS = ["darshanas.vedanta", "paths.karma", "paths.dharma", "crisis.career"]
TERMS = {
    "darshanas.vedanta": "brahman",
    "paths.karma": "karma",
    "paths.dharma": "dharma",
    "crisis.career": "job",
}
CONCEPT = [
    "the sages taught that {term} is the ground of all things",
    "{term} was the subject of the long talk today",
    "in the village they often spoke of {term} after dinner",
    "she wrote a small book about {term} and her teacher",
]
EVERYDAY = [
    "we cooked rice and lentils for dinner",
    "the rain fell on the roof all night",
    "the bus to the coast left late this morning",
    "he planted beans in the garden after lunch",
]


def corpus() -> list[str]:
    concept = [t.format(term=TERMS[ref]) for t, ref in itertools.product(CONCEPT, REFS)]
    return concept + EVERYDAY * 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[torch.nn.Module, object, Path]:
    """The model, its tokenizer and the directory it is saved in: 120 steps, about 4 s.

    Measured at the lexicon word of each ref in three sentences, its module's score minus the
    next one: at least 0.97 for seeds 0-3 (routing weight 1 instead of 5: -0.10 for seed 0).
    """
    from dharma_kernel import registry

    texts = corpus()
    tokenizer = word_tokenizer(texts)
    classes = {ref: registry.load(registry.resolve(ref, "module")) for ref in REFS}
    layout = {
        "at_layers": [0, 1],
        "composition": "routed",
        "top_k": 1,
        "modules": [{"ref": ref, "config": classes[ref].make_config("tiny").model_dump()} for ref in REFS],
        "loss": {"lm": 1.0, "concept": 1.0, "router": 0.01, "routing": 5.0},
    }
    model = build_model(tiny_backbone_config(vocab_size=len(tokenizer)), layout, seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lexicons = lexicons_for(REFS)
    rng = random.Random(0)
    with one_thread():
        for _ in range(120):
            batch = label_batch(rng.sample(texts, 16), tokenizer, REFS, max_length=32, lexicons=lexicons)
            loss = model(**batch, labels=batch["input_ids"]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    directory = save(model, tmp_path_factory.mktemp("explain") / "model", tokenizer)
    return model, tokenizer, directory


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """A saved model without modules."""
    tokenizer = word_tokenizer(corpus())
    model = build_model(tiny_backbone_config(vocab_size=len(tokenizer)), {})
    return save(model, tmp_path_factory.mktemp("plain") / "model", tokenizer)


def text_for(ref: str) -> str:
    return f"after dinner the teacher spoke of {TERMS[ref]} in the village"


@pytest.mark.parametrize("ref", REFS)
def test_the_top_module_at_a_lexicon_word_is_its_module(trained, capsys, ref):
    model, tokenizer, directory = trained
    text = text_for(ref)
    with one_thread():
        explanation = explain_text(model, tokenizer, text, top=2)
    word = next(r for r in explanation.tokens if r.token == TERMS[ref])
    numbers = [(s.module, round(s.score, 3)) for s in word.top]
    assert word.top[0].module == ref, numbers
    assert word.top[0].score - word.top[1].score > 0.5, numbers
    # Before the word, no concept: every module's score stays below the word's top one.
    first = explanation.tokens[1]
    assert first.top[0].score < word.top[0].score

    result = json.loads(cli_output(capsys, "explain", directory, text, "--json"))
    cli_word = next(r for r in result["tokens"] if r["token"] == TERMS[ref])
    assert cli_word["top"][0]["module"] == ref
    assert cli_word["top"][0]["score"] == pytest.approx(word.top[0].score, abs=1e-6)


def test_json_holds_the_models_scores_and_routing_at_every_token(trained, capsys):
    model, tokenizer, directory = trained
    text = "the sages taught that brahman is the ground of all"
    result = json.loads(cli_output(capsys, "explain", directory, text, "--json", "--top", "3"))
    assert set(result) == {"model", "composition", "dropped", "html", "tokens"}
    assert result["model"] == str(directory) and result["composition"] == "routed"
    assert result["dropped"] == 0 and result["html"] is None

    encoded = tokenizer(text, return_offsets_mapping=True)
    ids = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    tokens = result["tokens"]
    assert len(tokens) == ids.shape[1] == 11  # [BOS] and ten words
    assert tokens[0]["token"] == "[BOS]" and (tokens[0]["start"], tokens[0]["end"]) == (0, 0)
    for position, (record, offsets) in enumerate(zip(tokens, encoded["offset_mapping"], strict=True)):
        assert set(record) == {"token", "start", "end", "top", "routed"}
        assert [record["start"], record["end"]] == list(offsets)
        if position:
            assert record["token"] == text[record["start"] : record["end"]]
        assert len(record["top"]) == 3
        scores = [entry["score"] for entry in record["top"]]
        assert scores == sorted(scores, reverse=True)
        for entry in record["top"]:
            expected = out.module_scores[entry["module"]][0, position].item()
            assert entry["score"] == pytest.approx(expected, abs=1e-6)
        # the unlisted module scores no higher than the third listed one
        rest = set(REFS) - {entry["module"] for entry in record["top"]}
        assert all(out.module_scores[r][0, position].item() <= scores[-1] for r in rest)
        routed = {ref for ref in REFS if out.module_active[ref][0, position]}
        assert set(record["routed"]) == routed and 1 <= len(routed) <= 2  # top_k 1 at two layers


def test_the_terminal_table_has_one_line_per_token(trained, capsys):
    _, _, directory = trained
    text = "the sages taught that brahman is the ground"
    stdout = cli_output(capsys, "explain", directory, text, "--top", "2")
    lines = stdout.splitlines()
    assert lines[0] == f"{directory}: 9 tokens, routed composition"
    assert lines[1].split() == ["#", "token", "top", "1", "top", "2", "routed"]
    rows = [line.split() for line in lines[2:-1]]
    assert [row[:2] for row in rows] == [["0", "[BOS]"]] + [
        [str(i + 1), w] for i, w in enumerate(text.split())
    ]
    brahman = rows[5]
    assert brahman[2] == "darshanas.vedanta" and 0.5 < float(brahman[3]) <= 1
    assert lines[-1].startswith("score: the router's probability")


def test_text_longer_than_the_context_keeps_its_last_tokens(trained, capsys):
    model, _, directory = trained
    text = " ".join(["rice"] * 70 + ["brahman"])  # 72 tokens with [BOS]; the model has 64 positions
    code, stdout, stderr = run_cli(capsys, "explain", directory, text, "--json")
    assert code == 0
    assert "the text has 72 tokens, more than the model's context of 64: explaining the last 64" in stderr
    result = json.loads(stdout)
    assert result["dropped"] == 8 and len(result["tokens"]) == 64
    assert result["tokens"][-1]["token"] == "brahman" and result["tokens"][-1]["end"] == len(text)


class Tokens(HTMLParser):
    """The page's token spans: (data-module, title, text)."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[list[str]] = []
        self.inside = False
        self.resources: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.resources += [attrs[a] for a in ("src", "href") if a in attrs]
        if tag == "link" or tag == "script" and "src" in attrs:
            self.resources.append(tag)
        if tag == "span" and "tok" in attrs.get("class", "").split():
            self.spans.append([attrs["data-module"], attrs["title"], ""])
            self.inside = True

    def handle_endtag(self, tag):
        self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.spans[-1][2] += data


def page_and_records(directory: Path, folder: Path, capsys) -> tuple[str, list[dict]]:
    text = "the rain fell on the roof and karma\nthe sages taught that brahman"
    page = folder / "out" / "page.html"
    result = json.loads(cli_output(capsys, "explain", directory, text, "--json", "--html", page))
    assert result["html"] == str(page)
    return page.read_text(), result["tokens"]


def hover(record: dict) -> str:
    lines = [f"{entry['module']} {entry['score']:.3f}" for entry in record["top"]]
    return "\n".join([*lines, f"routed: {', '.join(record['routed'])}"])


def test_page_is_self_contained_with_one_span_per_token(trained, tmp_path, capsys):
    page, records = page_and_records(trained[2], tmp_path, capsys)
    parsed = Tokens()
    parsed.feed(page)
    assert parsed.resources == [] and "url(" not in page and "@import" not in page
    assert len(parsed.spans) == len(records) == 14  # [BOS] and thirteen words
    for (module, title, shown), record in zip(parsed.spans, records, strict=True):
        assert module == record["top"][0]["module"]
        assert title == hover(record)
        assert shown == record["token"]
    assert "and karma\nthe sages" in re.sub(r"<[^>]+>", "", page)  # the text between tokens is kept


# Appended to a copy of the page: the title reports how many token spans Chromium laid out, and
# how many are painted in the family colour of the module they name.
PROBE = """<script>
addEventListener("load", () => {
  const spans = [...document.querySelectorAll("span.tok")];
  const painted = spans.filter(s => {
    const [r, g, b] = s.dataset.colour.split(",");
    return getComputedStyle(s).backgroundColor.startsWith(`rgba(${r}, ${g}, ${b},`) && s.offsetWidth > 0;
  });
  document.title = `tokens ${spans.length}, painted ${painted.length}`;
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (.ci/run installs Debian's chromium)")
def test_page_renders_in_headless_chromium(trained, tmp_path, capsys):
    page, records = page_and_records(trained[2], tmp_path, capsys)
    # The probe compares each span's painted colour with its module's family colour, given here.
    for ref in REFS:
        page = page.replace(
            f'data-module="{ref}"',
            f'data-module="{ref}" data-colour="{",".join(map(str, rgb(family_colour(ref))))}"',
        )
    probe = tmp_path / "probe.html"
    probe.write_text(page + PROBE)
    dom = chromium("--dump-dom", probe.as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"<title>tokens {len(records)}, painted {len(records)}</title>" in dom.stdout
    parsed = Tokens()
    parsed.feed(dom.stdout)
    assert [(m, t) for m, t, _ in parsed.spans] == [(r["top"][0]["module"], hover(r)) for r in records]
    karma = next(title for _, title, shown in parsed.spans if shown == "karma")
    assert karma.startswith("paths.karma 0.")


def test_generate_explain_lists_only_the_generated_tokens(trained, capsys):
    model, tokenizer, directory = trained
    prompt = "the sages taught that brahman"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              pad_token_id=0)[0].tolist()  # fmt: skip
    generated = full[ids.shape[1] :]
    assert len(generated) == 5

    stdout = cli_output(capsys, "generate", directory, prompt, "--temperature", "0", "--max-new-tokens", "5",
                        "--explain")  # fmt: skip
    lines = stdout.splitlines()
    assert lines[0] == prompt + tokenizer.decode(generated, skip_special_tokens=True)
    assert lines[1].split() == ["#", "token", "top", "1", "top", "2", "top", "3", "routed"]
    rows = [line.split() for line in lines[2:-1]]
    assert [row[:2] for row in rows] == [[str(i), tokenizer.decode([t])] for i, t in enumerate(generated)]

    # The records score each generated token with the prompt before it as context.
    explanation = explain_generated(model, tokenizer, full, ids.shape[1], top=4)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([full]), use_cache=False)
    for position, record in zip(range(ids.shape[1], len(full)), explanation.tokens, strict=True):
        for entry in record.top:
            assert entry.score == pytest.approx(out.module_scores[entry.module][0, position].item(), abs=1e-6)
        assert explanation.text[record.start : record.end] == record.token


def test_generate_explain_on_a_model_without_modules_is_an_error(plain, capsys):
    code, stdout, stderr = run_cli(
        capsys, "generate", plain, "the rain", "--explain", "--max-new-tokens", "2"
    )
    assert code == 2 and stdout == ""
    assert stderr.startswith("error: this model has no modules, so there is nothing to explain")


@pytest.mark.parametrize(
    "args, message",
    [
        (["{plain}", "the rain"], "error: this model has no modules, so there is nothing to explain"),
        (["{missing}", "the rain"], "error: {missing}: no such file or directory"),
        (["{model}", "  "], "error: the text is empty"),
    ],
)
def test_what_cannot_be_explained_is_a_clear_error(trained, plain, tmp_path, capsys, args, message):
    paths = {"plain": plain, "missing": tmp_path / "missing", "model": trained[2]}
    code, stdout, stderr = run_cli(capsys, "explain", *[a.format(**paths) for a in args])
    assert code == 2 and stdout == ""
    assert stderr.startswith(message.format(**paths)) and "Traceback" not in stderr


def test_the_function_refuses_a_model_without_modules():
    tokenizer = word_tokenizer(EVERYDAY)
    model = build_model(tiny_backbone_config(vocab_size=len(tokenizer)), {})
    with pytest.raises(DharmaError, match="no modules"):
        explain_text(model, tokenizer, "the rain fell")
