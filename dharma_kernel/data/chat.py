"""Conversations: the chat template, labels on the assistant's turns only, and fitting a context.

    ensure_chat_template(tokenizer)                # ours when it has none; saved with the tokenizer
    encoded = encode_chat(tokenizer, messages)     # ids; labels -100 except the assistant's tokens
    packed = pack_conversations(records, tokenizer, max_length, report)

Our template renders a conversation as

    <|system|>\\n{system}\\n<|user|>\\n{question}\\n<|assistant|>\\n{answer}<|endoftext|><|user|>\\n...

The assistant's end marker is the tokenizer's EOS, so generation stops there by
default. A tokenizer trained by ``dharma train`` has the role markers as special
tokens (one token each); any other byte-level tokenizer spells them as text and
round-trips them. The labels are computed from the template itself (any template
whose rendering of a conversation's beginning is a prefix of the whole), so a
pretrained tokenizer's own template works too.

Importing this module does not import torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import DharmaError
from ..padding import pad_id
from .fields import ROLES
from .records import Record
from .report import DataReport

if TYPE_CHECKING:
    from ..concepts import Lexicon
    from .packed import PackedData

__all__ = [
    "CHAT_TEMPLATE",
    "MARKERS",
    "ChatRows",
    "ChatTokens",
    "ControlTokenError",
    "assistant_spans",
    "control_tokens",
    "encode_chat",
    "ensure_chat_template",
    "fit_turns",
    "pack_conversations",
    "stop_token_ids",
]

MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
IGNORE = -100  # the label the LM loss skips (as concepts.IGNORE; not imported: that imports torch)

# `{% generation %}` marks what the assistant writes, so transformers'
# apply_chat_template(..., return_assistant_tokens_mask=True) gives our labels' mask too.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\\n' }}"
    "{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
    "{%- elif message['role'] in ['system', 'user'] %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{%- else %}"
    "{{- raise_exception('unknown role ' + message['role'] + '; roles are system, user, assistant') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


class ControlTokenError(ValueError):
    """A message spells one of the tokenizer's control tokens (``<|endoftext|>``, a role marker)."""


def ensure_chat_template(tokenizer: Any) -> Any:
    """``tokenizer``, given :data:`CHAT_TEMPLATE` when it has no chat template of its own.

    ``save_pretrained`` then writes it, and ``AutoTokenizer.from_pretrained`` of that
    directory has it: ``apply_chat_template`` works with plain transformers.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        if tokenizer.eos_token is None:
            raise DharmaError(
                "the tokenizer has no end-of-text (eos) token, which ends every assistant turn",
                hint="Use a tokenizer with an eos_token, or backbone.tokenizer = { train = true }.",
            )
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _render(tokenizer: Any, messages: list[dict[str, Any]], prompt: bool = False) -> str:
    turns = [{"role": turn["role"], "content": turn["content"]} for turn in messages]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    An assistant turn's span is what the template adds for it after the generation
    prompt: with our template, its content and the end marker.
    """
    eos = getattr(tokenizer, "eos_token", None)
    if (
        getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE
        and isinstance(eos, str)
        and all(turn["role"] in ROLES and isinstance(turn["content"], str) for turn in messages)
    ):  # else Jinja, which also says what is wrong with an unknown role or a content not text
        return _our_spans(eos, messages)
    text = _render(tokenizer, messages)
    spans = []
    for number, turn in enumerate(messages):
        if turn["role"] != "assistant" or number == 0:
            continue
        before = _render(tokenizer, messages[:number], prompt=True)
        through = _render(tokenizer, messages[: number + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DharmaError(
                "the tokenizer's chat template does not render the start of a conversation as a "
                "prefix of the whole, so its assistant turns cannot be found",
                hint="Remove chat_template from the tokenizer's files to use Dharma's template.",
            )
        spans.append((len(before), len(through)))
    return text, spans


def _our_spans(eos: str, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """:func:`assistant_spans` for :data:`CHAT_TEMPLATE`, written out: what its Jinja gives, without
    rendering every prefix of the conversation again (2 renders an answer, each about as slow as
    tokenizing the whole)."""
    parts: list[str] = []
    spans = []
    length = 0
    for number, turn in enumerate(messages):
        role, content = turn["role"], turn["content"]
        if role == "assistant":
            head, part = "<|assistant|>\n", f"<|assistant|>\n{content}{eos}"
            if number:
                spans.append((length + len(head), length + len(part)))
        else:
            part = f"<|{role}|>\n{content}\n"
        parts.append(part)
        length += len(part)
    return "".join(parts), spans


@dataclass
class ChatTokens:
    """A rendered conversation: ``ids``, ``labels`` (the id on the assistant's tokens, else -100),
    the character ``offsets`` of each token in ``text``."""

    text: str
    ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.ids)


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> ChatTokens:
    """``messages`` rendered with the tokenizer's chat template and tokenized.

    A token is trained on (its label is its id) when it overlaps an assistant turn's
    span (:func:`assistant_spans`): the assistant's words and its end marker, so the
    model learns to stop; the system and user turns and every role marker are -100.
    Raises :class:`ControlTokenError` when a message spells a control token, which
    would otherwise be read as one.
    """
    control = control_tokens(tokenizer)
    for turn in messages:
        found = next((token for token in control if token in turn["content"]), None)
        if found is not None:
            raise ControlTokenError(f"a {turn['role']} message contains the control token {found!r}")
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(
        text,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        verbose=False,
    )
    ids, offsets = list(encoded["input_ids"]), [tuple(pair) for pair in encoded["offset_mapping"]]
    labels = [IGNORE] * len(ids)
    span = 0
    for position, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            labels[position] = ids[position]
    return ChatTokens(text, ids, labels, offsets)


def control_tokens(tokenizer: Any) -> list[str]:
    """The strings the tokenizer reads as special or added tokens (EOS, the role markers)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []))
    tokens.update(str(token) for token in getattr(tokenizer, "added_tokens_decoder", {}).values())
    return sorted(token for token in tokens if token)


def fit_turns(
    messages: list[dict[str, Any]], length: Callable[[list[dict[str, Any]]], int], budget: int
) -> list[dict[str, Any]] | None:
    """``messages``, or as many of the latest as fit: ``length(kept) <= budget``.

    The system message is always kept. The oldest exchanges (a user message and the
    turns up to the next user message) are dropped one at a time; None when even the
    last exchange does not fit. ``dharma chat`` keeps its history with this rule,
    and training fits long conversations into ``max_length`` with it.
    """
    for kept in _latest_turns(messages):
        if length(kept) <= budget:
            return kept
    return None


def _latest_turns(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``messages``, then without its first exchange, and so on down to its last exchange."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    starts = [number for number, turn in enumerate(rest) if turn["role"] == "user"] or [0]
    return [system + rest[start:] for start in starts]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end an assistant turn: EOS, and the last token the template writes after
    the assistant's words (EOS again with our template)."""
    probe = encode_chat(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    last = [label for label in probe.labels if label != IGNORE][-1:]
    return list(dict.fromkeys([tokenizer.eos_token_id, *last]))


def pack_conversations(
    records: Sequence[Record],
    tokenizer: Any,
    max_length: int,
    report: DataReport | None = None,
    refs: Sequence[str] = (),
    lexicons: dict[str, Lexicon] | None = None,
) -> PackedData:
    """Conversation records (``record.messages``) in rows of ``max_length`` tokens.

    Each conversation lies whole in one row, so every answer sees its question; rows
    take conversations in order while they fit, then are right-padded. Turns after the
    last assistant turn are left out. A conversation longer than ``max_length`` loses
    its oldest exchanges (:func:`fit_turns`); if its last exchange alone is too long, that
    exchange is cut at ``max_length`` tokens. A conversation whose cut leaves no
    assistant token, or that spells a control token, is dropped. Each is counted in
    ``report``. labels: -100 except on the assistant's tokens
    (:func:`encode_chat`). concept_labels (with ``refs``): from tags and lexicon hits
    over the rendered text, cumulative within the conversation, -100 on control
    tokens and padding. :class:`ChatRows` does the same a part of the records at a time.
    """
    rows = ChatRows(tokenizer, max_length, report, refs, lexicons)
    return rows._packed(rows._rows(records) + rows._last())


class ChatRows:
    """:func:`pack_conversations` over records given a part at a time, in bounded memory:
    :meth:`add` gives the rows the part completes, :meth:`close` the last one. Together they
    equal ``pack_conversations`` of all the parts at once."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        report: DataReport | None = None,
        refs: Sequence[str] = (),
        lexicons: dict[str, Lexicon] | None = None,
    ) -> None:
        ensure_chat_template(tokenizer)
        self.tokenizer, self.max_length, self.refs = tokenizer, max_length, tuple(refs)
        self.report = DataReport() if report is None else report
        if refs and lexicons is None:
            from ..concepts import lexicons_for

            lexicons = lexicons_for(refs)
        self.lexicons = lexicons
        self.control_ids = set(tokenizer.all_special_ids)
        self.open: list[tuple[Record, ChatTokens]] = []  # the row being filled
        self.used = max_length  # its tokens (a full row before the first, so the first starts one)

    def add(self, records: Sequence[Record]) -> PackedData:
        """The rows these records complete (the last row stays open for the next ones)."""
        return self._packed(self._rows(records))

    def close(self) -> PackedData:
        """The last row, if any."""
        return self._packed(self._last())

    def _rows(self, records: Sequence[Record]) -> list[list[tuple[Record, ChatTokens]]]:
        """The rows these records complete, each a list of (record, its tokens)."""
        done: list[list[tuple[Record, ChatTokens]]] = []
        for item in self._encoded(records):
            if self.used + len(item[1]) > self.max_length:
                if self.open:
                    done.append(self.open)
                self.open, self.used = [], 0
            self.open.append(item)
            self.used += len(item[1])
        return done

    def _last(self) -> list[list[tuple[Record, ChatTokens]]]:
        """The open row (none when empty), closed."""
        row, self.open, self.used = self.open, [], self.max_length
        return [row] if row else []

    def _encoded(self, records: Sequence[Record]) -> Iterator[tuple[Record, ChatTokens]]:
        for record in records:
            self.report.conversations += 1
            messages = _answered(record.messages or [])
            try:
                encoded = encode_chat(self.tokenizer, messages)
                if len(encoded) > self.max_length:
                    encoded = _fit(self.tokenizer, messages, self.max_length, self.report)
            except ControlTokenError:
                self.report.conversations_dropped["control_token"] += 1
                continue
            if encoded is None:
                self.report.conversations_dropped["too_long"] += 1
                continue
            yield record, encoded

    def _packed(self, rows: list[list[tuple[Record, ChatTokens]]]) -> PackedData:
        import numpy as np
        import torch

        from .packed import PackedData

        max_length, refs = self.max_length, self.refs
        input_ids = torch.full((len(rows), max_length), pad_id(self.tokenizer), dtype=torch.long)
        labels = torch.full((len(rows), max_length), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), max_length), dtype=torch.long)
        concept = np.full((len(rows), max_length, len(refs)), IGNORE, dtype=np.int8) if refs else None
        for row, items in enumerate(rows):
            begin = 0
            for record, encoded in items:
                end = begin + len(encoded)
                input_ids[row, begin:end] = torch.tensor(encoded.ids)
                labels[row, begin:end] = torch.tensor(encoded.labels)
                attention_mask[row, begin:end] = 1
                if concept is not None and self.lexicons is not None:
                    concept[row, begin:end] = _concept_labels(record, encoded, self.lexicons, refs,
                                                              self.control_ids)  # fmt: skip
                begin = end
        return PackedData(
            input_ids=input_ids,
            labels=labels,
            attention_mask=attention_mask,
            concept_labels=torch.from_numpy(concept) if concept is not None else None,
            refs=refs,
        )


def _answered(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages up to the last assistant turn: turns after it train nothing."""
    last = max((n for n, turn in enumerate(messages) if turn["role"] == "assistant"), default=-1)
    return messages[: last + 1] if last >= 0 else messages


def _fit(
    tokenizer: Any, messages: list[dict[str, Any]], max_length: int, report: DataReport
) -> ChatTokens | None:
    """A conversation longer than ``max_length`` made to fit: its latest turns that fit
    (:func:`fit_turns`), else its last exchange cut at ``max_length`` tokens (the end of
    the answer is lost); None when the cut leaves no assistant token."""
    encoded: dict[int, ChatTokens] = {}

    def length(turns: list[dict[str, Any]]) -> int:
        encoded[len(turns)] = encode_chat(tokenizer, turns)
        return len(encoded[len(turns)])

    turns = fit_turns(messages, length, max_length)
    if turns is not None:
        report.conversations_truncated += 1
        return encoded[len(turns)]
    last = encoded[len(_latest_turns(messages)[-1])]
    cut = ChatTokens(last.text, last.ids[:max_length], last.labels[:max_length], last.offsets[:max_length])
    if all(label == IGNORE for label in cut.labels):
        return None
    report.conversations_cut += 1
    return cut


def _concept_labels(
    record: Record,
    encoded: ChatTokens,
    lexicons: dict[str, Lexicon],
    refs: Sequence[str],
    control_ids: set[int],
) -> Any:
    import numpy as np

    from ..concepts import concept_hits

    labels = np.zeros((len(encoded), len(refs)), dtype=np.int8)
    tagged, hits = concept_hits(encoded.text, encoded.offsets, lexicons, refs, record.tags)
    labels[:, tagged] = 1
    if hits is not None:
        labels[np.logical_or.accumulate(hits, axis=0)] = 1  # the whole conversation is in one row
    labels[[token in control_ids for token in encoded.ids]] = IGNORE
    return labels
