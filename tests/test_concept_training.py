"""After a short training run, each module scores higher on text about its concept than on other text.

One tiny model holds every installed module of ``REFS`` and is trained once with the
LM and concept losses on synthetic sentences: each concept's templates filled with its
own lexicon terms, and everyday sentences (cooking, weather, travel...). The held-out
sentences use other templates and fillers. To cover another module, add its ref to
``REFS`` and its templates to ``TEMPLATES``.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch
from test_concepts import word_tokenizer

from dharma_kernel import registry
from dharma_kernel.assemble import build_model
from dharma_kernel.catalogue import distribution_for
from dharma_kernel.concepts import label_batch, lexicons_for
from dharma_kernel.errors import DharmaError
from dharma_kernel.evaluate import activation_auc, mean_activation
from dharma_kernel.testing import one_thread, tiny_backbone_config

REFS = ["paths.dharma", "darshanas.vedanta", "paths.karma", "consciousness.dhyana", "crisis.career"]

# "{term}" is filled with each of the module's own lexicon terms.
TEMPLATES = {
    "paths.dharma": {
        "train": [
            "{filler} the old teacher explained {term} to the students",
            "{term} asks each person to keep faith with their role {filler}",
            "a king who follows {term} protects his people {filler}",
            "{filler} she reflected on {term} and the right way to live",
        ],
        "held_out": [
            "without {term} a society loses its balance {filler}",
            "my grandmother often said that {term} holds the world together {filler}",
            "the epic returns to {term} again and again {filler}",
        ],
    },
    "darshanas.vedanta": {
        "train": [
            "{filler} the sages of the forest taught {term}",
            "{term} says that the seer and the seen are one {filler}",
            "the commentary of the master unfolds {term} {filler}",
            "{filler} the seeker asked about {term} beyond all names and forms",
        ],
        "held_out": [
            "{term} points past every change to what does not change {filler}",
            "the monk wrote about {term} in a long essay {filler}",
            "scholars debate {term} in the ancient texts {filler}",
        ],
    },
    "paths.karma": {
        "train": [
            "{filler} the farmer believed that {term} returns to the one who sows it",
            "{term} binds us until we give up the wish for reward {filler}",
            "the story shows how {term} shapes the next life {filler}",
        ],
        "held_out": [
            "{term} ripens slowly over many years {filler}",
            "every choice leaves a trace of {term} that lasts {filler}",
            "they say {term} is never lost {filler}",
        ],
    },
    "consciousness.dhyana": {
        "train": [
            "{filler} she sat still and practised {term} with closed eyes",
            "{term} steadies the mind on a single point {filler}",
            "the hermit spent the whole night in {term} {filler}",
        ],
        "held_out": [
            "deep {term} brings a silence without thoughts {filler}",
            "{term} begins with watching the breath {filler}",
        ],
    },
    "crisis.career": {
        "train": [
            "{filler} he worried about his {term} after the company closed",
            "{term} troubles kept her awake at night {filler}",
            "the counsellor talked with him about {term} choices {filler}",
        ],
        "held_out": [
            "losing the {term} left him anxious about the future {filler}",
            "a sudden change of {term} can feel frightening {filler}",
        ],
    },
}
EVERYDAY = {
    "train": [
        "{filler} we cooked rice with lentils and a little salt",
        "the rain kept falling on the roof {filler}",
        "{filler} the bus to the coast left ten minutes late",
        "he planted tomatoes and beans in the garden {filler}",
        "the market was busy and the mangoes were cheap {filler}",
        "{filler} the children played cricket in the street",
    ],
    "held_out": [
        "{filler} she baked bread and left it to cool on the table",
        "a strong wind blew the clouds across the hills {filler}",
        "we booked a small hotel near the station {filler}",
        "{filler} the football match ended in a draw",
        "the soup needs more pepper and some fresh coriander {filler}",
    ],
}
# Concept templates filled with these instead of a term are training negatives, so a module
# learns the term is the cue, not the words its templates happen to surround it with.
TOPICS = ("cricket", "the weather", "the bus timetable", "fresh bread", "the garden", "the price of mangoes")
# Everyday clauses among the fillers make concept text run on into unrelated words, so a
# module must hold "the concept so far" rather than fire only on the term itself.
FILLERS = {
    "train": [
        "today",
        "in the morning",
        "after lunch with friends",
        "while the rice was cooking",
        "as the bus left the station",
        "on a rainy day in the garden",
    ],
    "held_out": [
        "last autumn",
        "by the lamp",
        "during the long holiday",
        "while the bread cooled on the table",
        "as the wind blew across the hills",
    ],
}


def installed(ref: str) -> bool:
    try:
        registry.resolve(ref, "module")
    except DharmaError:
        return False
    return True


def sentences(templates: list[str], fillers: list[str], terms: tuple[str, ...] = ("",)) -> list[str]:
    return [t.format(term=term, filler=f) for t, f, term in itertools.product(templates, fillers, terms)]


@dataclass
class Trained:
    model: torch.nn.Module
    tokenizer: object
    held_out: dict[str, list[str]]  # ref or "everyday" -> sentences


def train(refs: list[str], composition: str, steps: int = 300, seed: int = 0) -> Trained:
    """A tiny model with ``refs`` at both layers, trained on the LM and concept losses (and routed,
    the routers on the concept labels too)."""
    classes = {ref: registry.load(registry.resolve(ref, "module")) for ref in refs}
    corpus = {split: {} for split in ("train", "held_out")}
    for split, data in corpus.items():
        for ref in refs:
            data[ref] = sentences(TEMPLATES[ref][split], FILLERS[split], classes[ref].concepts)
        data["everyday"] = sentences(EVERYDAY[split], FILLERS[split])
    concept_templates = [t for ref in refs for t in TEMPLATES[ref]["train"]]
    corpus["train"]["contrast"] = sentences(concept_templates, FILLERS["train"], TOPICS)
    # Held-out words outside the training vocabulary become [UNK], as for any word-level model.
    tokenizer = word_tokenizer([s for group in corpus["train"].values() for s in group])
    unk = tokenizer.unk_token_id
    lexicons = lexicons_for(refs)
    terms = [term for ref in refs for term in classes[ref].concepts]
    protected = {i for ids in tokenizer(terms)["input_ids"] for i in ids} | set(tokenizer.all_special_ids)
    protected = torch.tensor(sorted(protected))
    layout = {
        "at_layers": [0, 1],
        "composition": composition,
        "top_k": 1,
        "modules": [{"ref": ref, "config": classes[ref].make_config("tiny").model_dump()} for ref in refs],
        "loss": {"lm": 1.0, "concept": 1.0, "router": 0.01},
    }
    model = build_model(tiny_backbone_config(vocab_size=len(tokenizer)), layout, seed=seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
    rng = random.Random(seed)
    groups = list(corpus["train"].values())
    with one_thread():
        for _ in range(steps):
            texts = [rng.choice(rng.choice(groups)) for _ in range(32)]
            batch = label_batch(texts, tokenizer, model.module_refs, max_length=64, lexicons=lexicons)
            labels = batch["input_ids"]
            # Word dropout teaches [UNK] as just another non-concept word.
            drop = (torch.rand(labels.shape) < 0.15) & ~torch.isin(labels, protected)
            batch["input_ids"] = labels.masked_fill(drop, unk)
            loss = model(**batch, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return Trained(model.eval(), tokenizer, corpus["held_out"])


@pytest.fixture(scope="module", params=["sequential", "routed"])
def trained(request) -> Trained:
    refs = [ref for ref in REFS if installed(ref)]
    if not refs:
        pytest.skip(f"none of {REFS} is installed")
    return train(refs, request.param)


@pytest.fixture(scope="module")
def held_out_auc(trained: Trained) -> dict[str, float | None]:
    """Per module, token AUC on all held-out text: its concept's tokens (from the first term on)
    against everyday text, other concepts' text and its own text before the term."""
    texts = [s for group in trained.held_out.values() for s in group]
    batch = label_batch(texts, trained.tokenizer, trained.model.module_refs, max_length=64)
    with one_thread():
        return activation_auc(trained.model, [batch])


def test_every_ref_has_templates():
    assert not set(REFS) - set(TEMPLATES)


# Measured (seed 0, CPU, all five modules installed), held-out AUC and mean activation
# on concept / everyday text:
#   paths.dharma          1.000  0.65 / 0.05
#   darshanas.vedanta     1.000  0.49 / 0.04
#   paths.karma           1.000  0.62 / 0.02
#   consciousness.dhyana  1.000  0.68 / 0.02
#   crisis.career         1.000  0.46 / 0.03
# Seeds 1-5 gave AUC >= 0.98 and margins >= 0.28; with only dharma and vedanta installed,
# AUC 1.000 and 0.73 / 0.01, 0.78 / 0.00.
@pytest.mark.parametrize("ref", REFS)
def test_module_scores_higher_on_its_concept_than_on_other_text(trained, held_out_auc, ref):
    if ref not in trained.model.module_refs:
        pytest.skip(f"{ref} is not installed: pip install {distribution_for(ref)}")
    lexicon = lexicons_for([ref])[ref]
    stray = [s for s in trained.held_out["everyday"] if lexicon.find(s)]
    assert not stray, f"everyday text holds {ref} terms; reword EVERYDAY or FILLERS: {stray[:3]}"
    auc = held_out_auc[ref].auc
    with one_thread():
        on_concept = mean_activation(trained.model, trained.held_out[ref], trained.tokenizer, ref)
        on_everyday = mean_activation(trained.model, trained.held_out["everyday"], trained.tokenizer, ref)
    numbers = f"AUC {auc}, mean activation {on_concept:.3f} on {ref} text, {on_everyday:.3f} on everyday"
    assert auc is not None and auc >= 0.9, numbers
    assert on_concept - on_everyday >= 0.2, numbers


def test_routed_model_sends_labelled_tokens_to_their_module(trained):
    """Routed: a token labelled with concept m goes to module m (top_k 1), on held-out text."""
    model = trained.model
    if model.config.layout["composition"] != "routed":
        pytest.skip("routing applies to the routed composition")
    texts = [s for ref in model.module_refs for s in trained.held_out[ref]]
    batch = label_batch(texts, trained.tokenizer, model.module_refs, max_length=64)
    with torch.no_grad(), one_thread():
        active = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).module_active
    labels = batch["concept_labels"]
    for column, ref in enumerate(model.module_refs):
        positive = labels[..., column] == 1
        share = float(active[ref][positive].float().mean())
        assert share >= 0.9, f"{ref}: {share:.2f} of its {int(positive.sum())} labelled tokens routed to it"
