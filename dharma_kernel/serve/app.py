"""The routes: OpenAI's ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``; ``/v1/predict``
for task heads; ``/health``; the chat page at ``/``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from .errors import APIError, from_validation
from .models import ServedModel
from .scheduler import QueueFull, Sampling, Sequence
from .schemas import ChatRequest, CompletionRequest, Generation, PredictRequest
from .text_stream import TextStream

SHUTDOWN = "the server is shutting down and its --grace ran out before this reply was finished; retry"


def create_app(served: dict[str, ServedModel], api_key: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for model in served.values():
            model.scheduler.start()  # in the server's event loop, where the routes submit to it
        yield
        for model in served.values():
            await model.scheduler.stop()

    app = FastAPI(title="dharma serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return await _api_error(request, APIError(error.status_code, str(error.detail), code=code))

    def authorize(request: Request) -> None:
        """A plain check in each /v1 route, not HTTP middleware: that would wrap every streamed chunk."""
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            what = "no API key was given" if not given else "the API key is wrong"
            raise APIError(
                401, f"{what}: send the server's key as 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

    async def accept(request: Request, schema: type[BaseModel]) -> tuple[Any, ServedModel]:
        """The key checked, the body parsed, the model found: every generating or predicting route."""
        authorize(request)
        body = await parse(request, schema)
        return body, pick(served, body.model)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Per model: sequences decoding and waiting; decode steps run and tokens generated so far
        (more tokens than steps: sequences shared forward passes)."""
        return {"status": "ok", "models": {name: stats(m.scheduler) for name, m in served.items()}}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [m.card() for m in served.values()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body, model = await accept(request, ChatRequest)
        turns = body.turns()
        ids = list(model.tokenizer.apply_chat_template(turns, add_generation_prompt=True)["input_ids"])
        return await respond(request, model, body, ids, model.chat_stops, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, model = await accept(request, CompletionRequest)
        text = body.text()
        ids = list(model.tokenizer(text)["input_ids"])
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        return await respond(
            request, model, body, ids, model.eos_ids, chat=False, echo=text if body.echo else ""
        )

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        body, model = await accept(request, PredictRequest)
        return await asyncio.to_thread(run_head, model, body)

    return app


def stats(scheduler: Any) -> dict[str, int]:
    return {
        "running": len(scheduler.running),
        "waiting": len(scheduler.waiting),
        "decode_steps": scheduler.steps,
        "generated_tokens": scheduler.generated,
    }


async def parse(request: Request, schema: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise from_validation(error) from None


def pick(served: dict[str, ServedModel], name: str) -> ServedModel:
    if name not in served:
        raise APIError(
            400, f"no model '{name}' here; served: {', '.join(served)}", param="model", code="model_not_found"
        )
    return served[name]


def budget(model: ServedModel, body: Generation, prompt_tokens: int, param: str, default: int | None) -> int:
    """The request's max_tokens, checked against the model's positions; when not given, ``default``
    (None: all that are left) or what is left, whichever is less."""
    limit, room = body.limit, model.context - prompt_tokens
    if limit is not None and limit >= model.context:
        raise APIError(
            400,
            f"max_tokens is {limit}; the model '{model.name}' has {model.context} positions "
            f"in all, so at most {model.context - 1}",
            param="max_tokens",
            code="invalid_value",
        )
    if room < (limit or 1):
        raise APIError(
            400,
            f"this model's context is {model.context} tokens; the prompt is {prompt_tokens} tokens and "
            f"max_tokens is {limit or 1}. Shorten the prompt or lower max_tokens.",
            param=param,
            code="context_length_exceeded",
        )
    return limit or min(room, default or room)


async def respond(
    request: Request,
    model: ServedModel,
    body: Generation,
    ids: list[int],
    stop_ids: frozenset[int],
    chat: bool,
    echo: str = "",
) -> Response:
    # OpenAI's defaults: a chat reply may fill the context, a plain completion is 16 tokens
    max_tokens = budget(model, body, len(ids), "messages" if chat else "prompt", None if chat else 16)
    options = body.dharma
    explain = bool(options and options.explain)
    if explain and not model.model.module_refs:
        raise APIError(
            400,
            f"model '{model.name}' has no modules to explain",
            param="dharma.explain",
            code="invalid_value",
        )
    events: asyncio.Queue = asyncio.Queue()
    sequence = Sequence(
        ids,
        max_tokens,
        stop_ids,
        Sampling(body.temperature, body.top_p, body.seed),
        events.put_nowait,  # the decode loop runs in this thread
        explain=explain,
        top_modules=options.top_modules if options else 3,
    )
    try:
        model.scheduler.submit(sequence)
    except QueueFull as error:
        raise APIError(
            429,
            f"the server is busy ({error}); retry shortly",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    reply = Reply(model, body, sequence, events, TextStream(model.tokenizer, body.stop or [], stop_ids), chat)
    if body.stream:
        return StreamingResponse(
            reply.sse(request, echo), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return JSONResponse(await reply.whole(request, echo))


class Reply:
    """One request's events from the scheduler, as OpenAI's response or its stream of chunks."""

    def __init__(
        self,
        model: ServedModel,
        body: Generation,
        sequence: Sequence,
        events: asyncio.Queue,
        text: TextStream,
        chat: bool,
    ) -> None:
        self.model, self.body, self.sequence, self.events, self.text, self.chat = (
            model,
            body,
            sequence,
            events,
            text,
            chat,
        )
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    async def pieces(self) -> AsyncIterator[tuple[str, dict | None, str | None]]:
        """``(text, token record or None, finish_reason or None)`` until the end."""
        try:
            while True:
                event = await self.events.get()
                if event[0] == "gone":
                    return
                if event[0] == "error":
                    raise APIError(500, event[1], code="generation_failed")
                if event[0] == "done":
                    if event[1] == "shutdown":
                        raise APIError(503, SHUTDOWN, code="server_shutdown")
                    reason = "stop" if self.text.stopped else event[1]
                    yield self.text.finish(), None, reason
                    return
                _, token, top = event
                delta = self.text.push(token)
                record = None
                if top is not None:
                    record = {
                        "id": token,
                        "text": self.model.tokenizer.decode([token], skip_special_tokens=True),
                        "top": [{"module": m, "score": s} for m, s in top],
                    }
                if self.text.stopped:  # a stop sequence: end now, free the slot
                    self.sequence.cancel()
                    yield delta, record, "stop"
                    return
                yield delta, record, None
        finally:
            self.sequence.cancel()

    @contextlib.asynccontextmanager
    async def watched(self, request: Request) -> AsyncIterator[None]:
        """While the reply is made: a client that goes away cancels the sequence (it leaves the batch
        at the next step) and ends :meth:`pieces`. One waiting task a request, nothing a token."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.sequence.cancel()
            self.events.put_nowait(("gone",))

        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.sequence.prompt), len(self.sequence.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self, request: Request, echo: str) -> dict[str, Any]:
        parts, records, reason = [echo], [], None
        async with self.watched(request):
            async for text, record, finish in self.pieces():
                parts.append(text)
                records.append(record) if record is not None else None
                reason = finish or reason
        text = "".join(parts)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(finish_reason=reason, logprobs=None)
        result = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model.name,
            "choices": [choice],
            "usage": self.usage(),
        }
        if records:
            result["dharma"] = {"tokens": records}
        return result

    def chunk(
        self, text: str | None, finish: str | None, records: list[dict] | None = None
    ) -> dict[str, Any]:
        if self.chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(finish_reason=finish, logprobs=None)
        chunk = {
            "id": self.id,
            "object": self.object + ("" if not self.chat else ".chunk"),
            "created": self.created,
            "model": self.model.name,
            "choices": [choice],
        }
        if records:
            chunk["dharma"] = {"tokens": records}
        return chunk

    async def sse(self, request: Request, echo: str) -> AsyncIterator[str]:
        def event(value: dict) -> str:
            return f"data: {json.dumps(value, ensure_ascii=False)}\n\n"

        if self.chat:
            first = self.chunk("", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield event(first)
        elif echo:
            yield event(self.chunk(echo, None))
        # Chunks already waiting go out in one write: fewer sends when the loop is busy with many streams.
        ready: list[str] = []
        try:
            async with self.watched(request):
                async for text, record, finish in self.pieces():
                    if text or record is not None:
                        ready.append(event(self.chunk(text, None, [record] if record else None)))
                    if finish is not None:
                        ready.append(event(self.chunk(None, finish)))
                    if ready and self.events.empty():
                        yield "".join(ready)
                        ready = []
        except APIError as error:
            ready.append(event(error.body()))
        if ready:
            yield "".join(ready)
        options = self.body.stream_options
        if options is not None and options.include_usage:
            usage = {**self.chunk(None, None), "choices": [], "usage": self.usage()}
            yield event(usage)
        yield "data: [DONE]\n\n"


def run_head(model: ServedModel, body: PredictRequest) -> dict[str, Any]:
    """``dharma predict``'s record for one input."""
    import torch

    from ..errors import DharmaError
    from ..head_data import pick_head, predict_records

    try:
        head = pick_head(model.model, body.head)
    except DharmaError as error:
        raise APIError(400, str(error), param="head", code="invalid_value") from None
    record = {"question": body.question, "context": body.context, **body.inputs}
    record = {k: v for k, v in record.items() if v is not None}
    if body.text is not None:
        record.setdefault(type(head).inputs[0], body.text)
    missing = [name for name in type(head).inputs if not record.get(name)]
    if missing:
        raise APIError(
            400,
            f"the {head.name} head needs {', '.join(missing)}",
            param=missing[0],
            code="missing_required_parameter",
        )
    try:
        with torch.no_grad():
            prediction = predict_records(head, model.model, model.tokenizer, [record])[0]
    except DharmaError as error:
        raise APIError(400, str(error), code="invalid_value") from None
    return {"object": "prediction", "model": model.name, "head": head.name, "prediction": prediction}
