"""Continuous batching: one decode loop per model, a task on the server's event loop.

Between decode steps the loop admits waiting sequences (each prefilled alone, then joined
to the batch's cache) and drops finished or cancelled ones (their rows cut from the cache).
Each step feeds every running sequence its last token in one forward. A sequence's tokens
depend only on its own prompt, sampling settings and seed: its rows of the batched forward
see only its own cache positions (the rest are masked padding), and sampling draws from its
own generator.

The loop runs in the event loop's thread, not a thread of its own, and yields to it after each
forward. A decode thread would hand every token to the event loop across threads: each hand-off
wakes the loop, and the two threads then take turns on the GIL (most of a small model's forward
is Python), which cost one client 1 to 8% of its tokens/s side by side. In one thread nothing
waits on another thread, and nothing here needs a lock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from . import batch_cache

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """temperature 0: greedy. seed None: a fresh random seed."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Sequence:
    """One request's generation. ``deliver`` receives ``("token", id, top)``, ``("done", reason)``
    or ``("error", message)``, in the event loop's thread. ``top``: the token's
    ``[(module, score), ...]`` when ``explain``, else None. ``reason``: ``"stop"``, ``"length"``,
    or what :meth:`Scheduler.end` was given."""

    prompt: list[int]
    max_tokens: int
    stop_ids: frozenset[int]
    sampling: Sampling
    deliver: Callable[[tuple], None]
    explain: bool = False
    top_modules: int = 3
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    final: str | None = None  # set when the last token is chosen; emitted once it has been scored
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Leave the batch at the next step (a client that went away)."""
        self.cancelled = True

    @property
    def fed(self) -> int:
        """Tokens in the cache: the prompt and every generated token but the last."""
        return len(self.prompt) + len(self.tokens) - 1


class QueueFull(Exception):
    pass


class Scheduler:
    """The decode loop of one model. ``start`` it in the event loop that will ``submit`` to it."""

    def __init__(self, model: Any, max_batch: int = 16, max_queue: int = 64) -> None:
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.refs = list(model.module_refs)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.steps = 0  # decode forwards run (each with the whole batch)
        self.generated = 0  # tokens chosen, over all sequences
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Run the loop as a task of the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dharma-serve-decode")

    def submit(self, sequence: Sequence) -> None:
        free = max(0, self.max_batch - len(self.running))  # admitted at the next step
        if len(self.waiting) >= self.max_queue + free:
            raise QueueFull(f"{len(self.running)} requests are running and {len(self.waiting)} waiting")
        if sequence.generator is None and sequence.sampling.temperature > 0:
            sequence.generator = torch.Generator()
            if sequence.sampling.seed is None:
                sequence.generator.seed()
            else:
                sequence.generator.manual_seed(sequence.sampling.seed)
        self.waiting.append(sequence)
        self._wake.set()

    def end(self, reason: str) -> None:
        """End every running and waiting sequence now with ``("done", reason)``. The loop runs in this
        thread, so this always falls between two forwards."""
        for sequence in [*self.running, *self.waiting]:
            if not sequence.cancelled:
                sequence.cancelled = True
                sequence.deliver(("done", reason))
        self.running, self.waiting, self.cache = [], collections.deque(), None

    async def stop(self) -> None:
        """End the loop; sequences still running or waiting end with ``"shutdown"``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.end("shutdown")

    async def _loop(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            while self.waiting and len(self.running) < self.max_batch:
                sequence = self.waiting.popleft()
                self._guarded(self._prefill, sequence)
                await asyncio.sleep(0)  # the routes and streams get their turn after each forward
            self._guarded(self._decode)
            await asyncio.sleep(0)

    def _guarded(self, work: Callable[..., None], *sequences: Sequence) -> None:
        """A failed forward ends every sequence in it (and ``sequences``), not the server."""
        try:
            with torch.inference_mode():
                work(*sequences)
        except Exception as error:
            log.exception("decode step failed")
            for sequence in {id(s): s for s in [*self.running, *sequences]}.values():
                if not sequence.cancelled:
                    sequence.cancelled = True
                    sequence.deliver(("error", f"generation failed: {error}"))
            self.running, self.cache = [], None

    def _decode(self) -> None:
        self._drop_finished()
        if self.running:
            self._step()
            self._drop_finished()

    def _prefill(self, sequence: Sequence) -> None:
        if sequence.cancelled:
            return
        ids = torch.tensor([sequence.prompt], dtype=torch.long)
        cache = DynamicCache(config=self.model.config.text_config)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True)
        self._choose(sequence, out.logits[0, -1])
        self.cache = cache if not self.running else batch_cache.join([self.cache, cache])
        self.running.append(sequence)

    def _step(self) -> None:
        length = batch_cache.cache_length(self.cache)
        ids = torch.tensor([[s.tokens[-1]] for s in self.running], dtype=torch.long)
        positions = torch.tensor([[s.fed] for s in self.running], dtype=torch.long)
        mask = (torch.arange(length + 1) >= length - positions).long()  # each row's real positions
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True
        )
        self.steps += 1
        scores = self._scores(out) if any(s.explain for s in self.running) else None
        logits = out.logits[:, -1]
        greedy = logits.argmax(-1).tolist()  # one call for every greedy row
        for row, sequence in enumerate(self.running):
            if sequence.cancelled:
                continue
            if sequence.explain:  # the token just fed now has its module scores
                sequence.deliver(("token", sequence.tokens[-1], self._top(scores, row, sequence.top_modules)))
                if sequence.final is not None:
                    sequence.deliver(("done", sequence.final))
                    sequence.cancelled = True
                    continue
            self._choose(sequence, logits[row], greedy[row])

    def _choose(self, sequence: Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Pick the next token (``greedy``: the argmax, when already known); emit it (unless explaining:
        then once it is fed) and see if it ends."""
        if sequence.cancelled:
            return
        if greedy is not None and sequence.sampling.temperature <= 0:
            token = greedy
        else:
            token = _next_token(logits, sequence.sampling, sequence.generator)
        sequence.tokens.append(token)
        self.generated += 1
        reason = None
        if token in sequence.stop_ids:
            reason = "stop"
        elif len(sequence.tokens) >= sequence.max_tokens:
            reason = "length"
        if reason == "stop":  # the end marker is never shown, so never needs scores
            sequence.deliver(("done", "stop"))
            sequence.cancelled = True
        elif not sequence.explain:
            sequence.deliver(("token", token, None))
            if reason is not None:
                sequence.deliver(("done", reason))
                sequence.cancelled = True
        else:
            sequence.final = reason

    def _drop_finished(self) -> None:
        keep = [row for row, s in enumerate(self.running) if not s.cancelled]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[row] for row in keep]
        if not self.running:
            self.cache = None
            return
        length = batch_cache.cache_length(self.cache)
        padding = min(length - s.fed for s in self.running)
        batch_cache.select(self.cache, keep, padding)

    def _scores(self, out: Any) -> torch.Tensor | None:
        if not self.refs or not out.module_scores:
            return None
        return torch.stack([out.module_scores[ref][:, -1] for ref in self.refs], dim=-1).float()

    def _top(self, scores: torch.Tensor | None, row: int, count: int) -> list[tuple[str, float]]:
        if scores is None:
            return []
        row = scores[row]
        order = torch.argsort(row, descending=True, stable=True)[:count].tolist()
        return [(self.refs[i], round(float(row[i]), 4)) for i in order]


def _next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    logits = logits.float()
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always)
        outside = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
