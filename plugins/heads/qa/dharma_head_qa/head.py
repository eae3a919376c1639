"""The extractive QA head: start and end logits over the context tokens."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dharma_kernel.backbone import context_length
from dharma_kernel.head_data import max_length_of, model_batch, pad_features, pad_id, to_device
from dharma_kernel.protocol import HeadModule, HeadOutput, ModuleConfig

from .features import Window, char_span, encode_record
from .lookahead import Lookahead
from .metrics import qa_scores
from .records import parse_record
from .spans import best_span

WINDOWS_PER_FORWARD = 32


class QAConfig(ModuleConfig):
    max_answer_tokens: int = 30  # longest span a prediction may choose
    max_question_tokens: int = 64  # a longer question keeps its first tokens
    stride: int = 32  # context tokens shared by neighbouring windows of a long context
    lookahead_heads: int = 2  # 0: score each token from its causal state alone


class QAHead(HeadModule):
    """Predicts the answer's first and last context token; the answer is the text between them.

    ``context_mask`` ``[B, T]`` marks the context tokens: the question, the separator and
    padding can never be chosen. Trained with the mean cross-entropy of the start and
    end positions.
    """

    name = "qa"
    module_api = "1.0"
    Config = QAConfig
    inputs: ClassVar[tuple[str, ...]] = ("question", "context")
    targets: ClassVar[tuple[str, ...]] = ("answer",)
    field_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"answer": ("answers",)}
    metric = "exact_match"
    pad_values: ClassVar[dict[str, int | float]] = {"context_mask": 0}

    def __init__(self, hidden_size: int, config: QAConfig | None = None) -> None:
        super().__init__(hidden_size, config)
        heads = self.config.lookahead_heads
        self.lookahead = Lookahead(hidden_size, heads) if heads > 0 else None
        # No biases before the scores: a shift shared by all positions never changes a softmax
        # over positions, so it would get no gradient and could never learn.
        self.norm = nn.LayerNorm(hidden_size, bias=False)
        # Each token is scored from its own state and the next token's: in a causal model the
        # next state is the first to see what follows, and where a word ends shows there.
        self.span = nn.Linear(2 * hidden_size, 2, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        context_mask: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> HeadOutput:
        if self.lookahead is not None:
            hidden = self.lookahead(hidden, attention_mask)
        states = self.norm(hidden)
        if attention_mask is not None:  # padding reads as "nothing follows", as the sequence end does
            states = states * attention_mask[..., None].to(states.dtype)
        following = F.pad(states[:, 1:], (0, 0, 0, 1))
        start, end = self.span(torch.cat([states, following], dim=-1)).float().unbind(-1)
        if context_mask is None:  # without one, any real token may be chosen
            context_mask = attention_mask if attention_mask is not None else torch.ones_like(start)
        outside = ~context_mask.bool()
        lowest = torch.finfo(start.dtype).min
        start, end = start.masked_fill(outside, lowest), end.masked_fill(outside, lowest)
        losses = {}
        if start_positions is not None and end_positions is not None:
            losses["span"] = (
                F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)
            ) / 2
        return HeadOutput({"start": start, "end": end}, losses)

    # -- data ------------------------------------------------------------------------------

    def _windows(self, record: dict[str, Any], tokenizer: Any, max_length: int, train: bool) -> list[Window]:
        parsed = parse_record(record, need_answer=train)
        c = self.config
        return encode_record(parsed, tokenizer, max_length, c.max_question_tokens, c.stride, train=train)

    def encode(self, record: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any]:
        """The first window holding the answer (records with one), else the first window."""
        labelled = "answer" in record or "answers" in record
        window = self._windows(record, tokenizer, max_length, train=labelled)[0]
        features: dict[str, Any] = {"input_ids": window.input_ids, "context_mask": window.context_mask}
        if labelled:
            features["start_positions"], features["end_positions"] = window.start, window.end
        return features

    def predict(
        self, model: nn.Module, tokenizer: Any, records: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Per record: the answer text, its character ``start`` and ``end`` in the context, and
        its ``score`` (start probability times end probability), best over the context's windows."""
        max_length = min(max_length_of(model), context_length(model.config.text_config, default=10**9))
        # a RecordError here (a record from `dharma predict`) becomes a message in predict_records
        per_record = [self._windows(record, tokenizer, max_length, train=False) for record in records]
        windows = [w for ws in per_record for w in ws]
        spans = []
        for first in range(0, len(windows), WINDOWS_PER_FORWARD):  # a book-length context stays in memory
            chunk = windows[first : first + WINDOWS_PER_FORWARD]
            features = [{"input_ids": w.input_ids, "context_mask": w.context_mask} for w in chunk]
            batch = to_device(model_batch(self.name, pad_features(features, pad_id(tokenizer))), model.device)
            logits = model(**batch, use_cache=False).heads[self.name].logits
            in_context = batch["head_labels"][self.name]["context_mask"]
            spans += [
                best_span(logits["start"][i], logits["end"][i], in_context[i], self.config.max_answer_tokens)
                for i in range(len(chunk))
            ]
        predictions, row = [], 0
        for record, ws in zip(records, per_record, strict=True):
            # every window holds at least one context token, so each has a span
            score, index = max((spans[row + i].score, row + i) for i in range(len(ws)))  # type: ignore[union-attr]
            span, window = spans[index], windows[index]
            start, end = char_span(record["context"], window.offsets, span.first, span.last)  # type: ignore[union-attr]
            answer = record["context"][start:end]
            predictions.append({"answer": answer, "start": start, "end": end, "score": round(score, 6)})
            row += len(ws)
        return predictions

    def metrics(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, float]:
        """``exact_match`` and ``f1`` in [0, 1], each answer scored against its record's best gold answer."""
        golds = [[a.text for a in parse_record(r).answers] for r in records]
        scores = qa_scores((p["answer"], g) for p, g in zip(predictions, golds, strict=True))
        return {"exact_match": scores["exact_match"], "f1": scores["f1"]}

    def format_prediction(self, prediction: dict[str, Any]) -> str:
        p = prediction
        return f"{p['answer']}\nchars {p['start']}..{p['end']}  score {p['score']:.4f}"
