"""``dharma chat``: talk to a chat model, one line a turn, the reply streamed as it is generated.

Registered on :data:`dharma_kernel.cli.app`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..errors import DharmaError
from .options import MaxNewTokensOption, TemperatureOption, TopPOption
from .output import _quiet_transformers, err

EXIT_COMMANDS = ("/exit", "/quit")


def chat(
    model_dir: Annotated[
        Path, typer.Argument(help="A run directory (its best checkpoint), a saved model or an application.")
    ],
    system: Annotated[str | None, typer.Option("--system", help="A system message to start with.")] = None,
    max_new_tokens: MaxNewTokensOption = 128,
    temperature: TemperatureOption = 0.7,
    top_p: TopPOption = 0.95,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    show_prompt: Annotated[
        bool, typer.Option("--show-prompt", help="Print each prompt and its token count to stderr.")
    ] = False,
) -> None:
    """Chat with a model: a line of input is your turn, until end of input or /exit.

    Keeps the history, dropping the oldest exchanges (never --system) when it would not fit.
    """
    import torch

    from ..application import load_application
    from ..backbone import context_length
    from ..data.chat import ensure_chat_template, stop_token_ids

    _quiet_transformers()
    model, tokenizer = load_application(model_dir)
    model.eval()
    ensure_chat_template(tokenizer)
    context = context_length(model.config.text_config)
    budget = context - max_new_tokens
    if budget < 8:
        raise DharmaError(
            f"--max-new-tokens {max_new_tokens} leaves {budget} tokens of the model's context of {context} "
            "for the conversation",
            hint=f"Use --max-new-tokens {max(1, context // 2)} or less.",
        )
    torch.manual_seed(seed)
    sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    stops = stop_token_ids(tokenizer)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            typer.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        text = clean_input(line, tokenizer)
        if text in EXIT_COMMANDS:
            break
        if not text:
            continue
        turns = [*history, {"role": "user", "content": text}]
        kept, ids = build_prompt(tokenizer, turns, budget)
        if kept is None:
            err.print(
                f"[bold red]error:[/] that message alone is {len(ids)} tokens; with --max-new-tokens "
                f"{max_new_tokens} the model's context of {context} leaves {budget}. Write a shorter one."
            )
            continue
        if show_prompt:
            err.print(
                f"prompt: {len(ids)} tokens, {len(kept)} of {len(turns)} messages, "
                f"context {context}, --max-new-tokens {max_new_tokens}"
            )
            err.print(escape(tokenizer.decode(ids)), end="\n---\n")
        reply, generated, ended = _generate(model, tokenizer, ids, max_new_tokens, stops, sampling)
        if show_prompt:
            err.print(
                f"reply: {generated} tokens, "
                + ("ended by the end marker" if ended else "cut at --max-new-tokens")
            )
        history = [*kept, {"role": "assistant", "content": reply}]


def clean_input(line: str, tokenizer: Any) -> str:
    """The line without surrounding whitespace or the tokenizer's control tokens, which the
    template alone may write."""
    from ..data.chat import control_tokens

    text = line.strip()
    for token in control_tokens(tokenizer):
        text = text.replace(token, "")
    return text.strip()


def build_prompt(
    tokenizer: Any, turns: list[dict[str, str]], budget: int
) -> tuple[list[dict[str, str]] | None, list[int]]:
    """``(kept, ids)``: the latest turns whose prompt (with the assistant's opening) is at most
    ``budget`` tokens (:func:`~dharma_kernel.data.chat.fit_turns`), and that prompt's ids;
    ``(None, ids of the last exchange)`` when even that does not fit."""
    from ..data.chat import fit_turns

    def prompt(messages: list[dict[str, str]]) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])

    kept = fit_turns(turns, lambda messages: len(prompt(messages)), budget)
    return kept, prompt(kept if kept is not None else turns[-1:])


def _generate(
    model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int, stops: list[int], sampling: dict
) -> tuple[str, int, bool]:
    """``(reply, tokens generated, whether the end marker ended it)``; the reply is streamed to
    stdout as it comes."""
    import torch
    from transformers import TextStreamer

    from ..padding import pad_id

    class Echo(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            sys.stdout.write(text + ("\n" if stream_end else ""))
            sys.stdout.flush()

    prompt = torch.tensor([ids])
    pad = pad_id(tokenizer)
    with torch.no_grad():
        result = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad,
            streamer=Echo(tokenizer, skip_prompt=True, skip_special_tokens=True),
            do_sample=bool(sampling),
            **sampling,
        )
    generated = result[0, len(ids) :].tolist()
    words = [token for token in generated if token not in stops]
    ended = bool(generated) and generated[-1] in stops
    return tokenizer.decode(words, skip_special_tokens=True).strip(), len(generated), ended
