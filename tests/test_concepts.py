"""Concept labels from lexicons and tags, and the ROC-AUC that evaluates modules against them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dharma_kernel.concept_activation import MIN_TOKENS, ConceptActivation, ModuleAuc
from dharma_kernel.concepts import IGNORE, Lexicon, label_batch, lexicons_for, token_labels
from dharma_kernel.evaluate import activation_auc, roc_auc

KARMA = Lexicon(["कर्म", "karma", "ātman", "action", "deed", "duty", "fruit of action", "one's own path"])


def word_tokenizer(texts: list[str]):
    """A lower-casing word-level fast tokenizer over ``texts`` that prepends a [BOS] special token."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    splitter = pre_tokenizers.Whitespace()
    words = {w for t in texts for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(t))}
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[BOS]", *sorted(words)])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = splitter
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]"
    )


def words(text: str) -> list[tuple[int, int]]:
    """Character spans of the space-separated words of ``text``: offsets as a tokenizer gives them."""
    spans, start = [], 0
    for word in text.split(" "):
        spans.append((start, start + len(word)))
        start += len(word) + 1
    return spans


def found(lexicon: Lexicon, text: str) -> list[str]:
    return [text[a:b] for a, b in lexicon.find(text)]


def test_latin_terms_match_whole_words_in_any_case():
    assert found(KARMA, "Karma, KARMA and karma.") == ["Karma", "KARMA", "karma"]
    assert found(KARMA, "karmic reaction in a deedless world") == []


def test_latin_terms_match_simple_plurals():
    assert found(KARMA, "karmas, deeds and actions; duties") == ["karmas", "deeds", "actions", "duties"]


def test_devanagari_terms_match_inside_compounds():
    text = "कर्मण्येवाधिकारस्ते मा फलेषु कदाचन"
    assert KARMA.find(text) == [(0, 4)]
    assert found(KARMA, "निष्कामकर्म") == ["कर्म"]


def test_iast_terms_match_folded_and_decomposed_forms():
    decomposed = "a\u0304tman"  # ā written as a + combining macron
    text = f"atman, Ātman and {decomposed}"
    assert found(KARMA, text) == ["atman", "Ātman", decomposed]
    assert KARMA.find(text)[-1] == (17, 23)  # offsets in the caller's text, not the normalised one


def test_multi_word_terms_match_across_any_whitespace():
    assert found(KARMA, "the fruit  of\naction ripens") == ["fruit  of\naction"]
    assert found(KARMA, "one’s own path") == ["one’s own path"]
    assert found(KARMA, "the fruit or action") == ["action"]


def test_overlapping_hits_merge():
    assert KARMA.find("fruit of actions") == [(0, 16)]


def test_a_tag_is_covered_only_by_a_whole_term():
    assert KARMA.covers(" Karma ") and KARMA.covers("कर्म")
    assert not KARMA.covers("karma yoga") and not KARMA.covers("")


def test_labels_are_causal_from_the_first_hit():
    text = "we spoke of karma and rain"
    labels = token_labels(text, words(text), {"paths.karma": KARMA}, ["paths.karma"])
    assert labels[:, 0].tolist() == [0, 0, 0, 1, 1, 1]


def test_a_term_split_into_pieces_is_labelled_from_its_last_piece():
    text = "Seva and service"
    pieces = [(0, 1), (1, 4), (4, 8), (8, 16)]  # "S" "eva" " and" " service", as a byte-level BPE cuts it
    lexicons = {"s": Lexicon(["seva"]), "t": Lexicon(["service"])}
    labels = token_labels(text, pieces, lexicons, ["s", "t"])
    assert labels[:, 0].tolist() == [0, 1, 1, 1]
    assert labels[:, 1].tolist() == [0, 0, 0, 1]


def test_a_term_cut_off_by_truncation_labels_nothing():
    text = "we spoke of seva"
    kept = [(0, 2), (2, 8), (8, 11), (11, 14)]  # truncated inside "seva"
    labels = token_labels(text, kept, {"s": Lexicon(["seva"])}, ["s"])
    assert labels[:, 0].tolist() == [0, 0, 0, 0]


def test_a_token_partly_overlapping_a_hit_starts_the_label():
    text = "निष्कामकर्म योग"
    labels = token_labels(text, words(text), {"k": KARMA}, ["k"])
    assert labels[:, 0].tolist() == [1, 1]


@pytest.mark.parametrize("tag", ["karma", "KARMA", "paths.karma", "कर्म", "fruit of action"])
def test_a_tag_naming_the_module_labels_every_token(tag):
    text = "a quiet morning by the river"
    lexicons = {"paths.karma": KARMA, "other.rain": Lexicon(["rain"])}
    labels = token_labels(text, words(text), lexicons, ["paths.karma", "other.rain"], tags=[tag])
    assert labels[:, 0].tolist() == [1] * 6
    assert labels[:, 1].tolist() == [0] * 6


def test_an_unrelated_tag_labels_nothing():
    text = "a quiet morning"
    labels = token_labels(text, words(text), {"paths.karma": KARMA}, ["paths.karma"], tags=["weather"])
    assert labels[:, 0].tolist() == [0, 0, 0]


def test_special_tokens_are_ignored():
    text = "karma now"
    offsets = [(0, 0), *words(text), (0, 0)]
    labels = token_labels(text, offsets, {"k": KARMA}, ["k"], tags=[])
    assert labels[:, 0].tolist() == [IGNORE, 1, 1, IGNORE]
    tagged = token_labels(text, offsets, {"k": KARMA}, ["k"], tags=["karma"])
    assert tagged[:, 0].tolist() == [IGNORE, 1, 1, IGNORE]


def test_label_batch_pads_right_and_ignores_padding_and_special_tokens():
    texts = ["rain and then karma came", "the karma"]
    tokenizer = word_tokenizer(texts)
    lexicons = {"paths.karma": KARMA, "other.rain": Lexicon(["rain"])}
    batch = label_batch(
        texts, tokenizer, ["paths.karma", "other.rain"], tags=[[], ["rain"]], lexicons=lexicons
    )
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["input_ids"][1, 3:].tolist() == [tokenizer.pad_token_id] * 3
    labels = batch["concept_labels"]
    assert labels.shape == (2, 6, 2)
    assert labels[0, :, 0].tolist() == [IGNORE, 0, 0, 0, 1, 1]
    assert labels[0, :, 1].tolist() == [IGNORE, 1, 1, 1, 1, 1]
    assert labels[1, :, 0].tolist() == [IGNORE, 0, 1, IGNORE, IGNORE, IGNORE]
    assert labels[1, :, 1].tolist() == [IGNORE, 1, 1, IGNORE, IGNORE, IGNORE]


def test_label_batch_uses_the_installed_plugins_lexicons():
    refs = ["paths.dharma", "darshanas.vedanta"]
    lexicons = lexicons_for(refs)
    texts = ["they followed svadharma", "brahman and ātman are one"]
    batch = label_batch(texts, word_tokenizer(texts), refs)
    assert lexicons["paths.dharma"].find(texts[0]) == [(14, 23)]
    assert batch["concept_labels"][0, :, 0].tolist() == [IGNORE, 0, 0, 1, IGNORE, IGNORE]
    assert batch["concept_labels"][1, 1:, 1].tolist() == [1, 1, 1, 1, 1]
    assert batch["concept_labels"][1, 1:, 0].tolist() == [0, 0, 0, 0, 0]


def test_roc_auc_matches_hand_computed_values():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # positives 0.35 and 0.8 beat 1 and 2 of the 2 negatives: 3 of 4 pairs
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


def test_roc_auc_counts_ties_as_half():
    # positive 0.5 ties both negatives (2 x 0.5), positive 0.9 beats both: 3 of 4 pairs
    assert roc_auc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == 0.75
    assert roc_auc([0.3] * 5, [0, 1, 1, 0, 1]) == 0.5
    # 2 positives x 3 negatives: 1.0 beats all 3; 0.4 beats 0.2, ties 0.4, loses to 0.6
    assert roc_auc([0.2, 0.4, 0.4, 0.6, 1.0], [0, 0, 1, 0, 1]) == pytest.approx(4.5 / 6)


def test_roc_auc_is_none_with_one_class():
    assert roc_auc([0.1, 0.9], [1, 1]) is None
    assert roc_auc([0.1, 0.9], [0, 0]) is None
    assert roc_auc([], []) is None


def test_roc_auc_rejects_bad_labels():
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc([0.1, 0.9], [0, 2])


class FixedScores(nn.Module):
    """Stands in for a DharmaModel: returns the scores it was given."""

    module_refs = ["paths.karma"]

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, use_cache):
        return SimpleNamespace(module_scores={"paths.karma": self.scores})


def test_activation_auc_counts_every_real_labelled_token():
    # Padding scores (last two columns of rows 1 and 2) would reverse the ranking if counted.
    pos, neg = 0.9, 0.1
    scores = torch.tensor([[neg, neg, pos, pos], [neg, neg, 0.0, 0.0], [pos, pos, 0.0, 0.0], [0.5] * 4])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [IGNORE] * 4])
    batch = {"input_ids": torch.zeros(4, 4, dtype=torch.long), "attention_mask": mask}
    model = FixedScores(scores.repeat(6, 1)).train()  # 6 copies: 24 positive, 24 negative tokens
    batch = {k: v.repeat(6, 1) for k, v in batch.items()}
    auc = activation_auc(model, [batch | {"concept_labels": labels.repeat(6, 1)[..., None].float()}])
    assert auc["paths.karma"] == ModuleAuc(1.0, 24, 24)  # row 3 (-100) left out
    assert model.training


def test_activation_auc_says_why_it_has_none():
    scores = torch.rand(2, 30)
    labels = torch.zeros(2, 30)
    labels[0, :5] = 1
    batch = {"input_ids": torch.zeros(2, 30, dtype=torch.long), "attention_mask": torch.ones(2, 30)}
    auc = activation_auc(FixedScores(scores), [batch | {"concept_labels": labels[..., None]}])
    assert auc["paths.karma"] == ModuleAuc(
        None, 5, 55, f"5 positive tokens (an AUC needs {MIN_TOKENS} of each)"
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auc_equals_the_exact_rank_statistic(seed):
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(3, 200, generator=generator) < 0.3).float()
    # overlapping classes, some scores tied, some very close to 0 or 1
    scores = torch.sigmoid(torch.randn(3, 200, generator=generator) * 4 + labels * 1.5)
    scores[0, :40] = 0.25
    table = ConceptActivation(["paths.karma"])
    table.add({"paths.karma": scores}, labels[..., None], torch.ones(3, 200))
    exact = roc_auc(scores.flatten().tolist(), labels.flatten().int().tolist())
    assert table.auc()["paths.karma"].auc == pytest.approx(exact, abs=2e-3)
    record = table.record()
    assert record["auc_median"] == pytest.approx(exact, abs=2e-3)


def test_summed_tables_give_the_auc_of_all_their_tokens():
    """Processes add their histograms (Distributed.sum): the AUC of the sum is that of all tokens."""
    scores, labels = torch.rand(4, 50), (torch.rand(4, 50) < 0.5).float()
    whole, first, second = (ConceptActivation(["paths.karma"]) for _ in range(3))
    whole.add({"paths.karma": scores}, labels[..., None], torch.ones(4, 50))
    first.add({"paths.karma": scores[:2]}, labels[:2, :, None], torch.ones(2, 50))
    second.add({"paths.karma": scores[2:]}, labels[2:, :, None], torch.ones(2, 50))
    first.merge(*(a + b for a, b in zip(first.state(), second.state(), strict=True)))
    assert first.auc() == whole.auc()
