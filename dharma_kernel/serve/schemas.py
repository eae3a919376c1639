"""Request bodies of the OpenAI endpoints (the fields we honour; others are refused by name)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from .errors import APIError


class Body(BaseModel):
    # A field we do not act on is refused by name: a misspelt or unsupported option would
    # otherwise change nothing without a word (``user`` is accepted: it only labels the request).
    model_config = ConfigDict(extra="forbid")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class DharmaOptions(BaseModel):
    """The ``dharma`` extension field: ``explain`` adds each token's top modules to the stream."""

    model_config = ConfigDict(extra="forbid")
    explain: StrictBool = False
    top_modules: int = Field(3, ge=1, le=37)


class Generation(Body):
    model: StrictStr
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: StrictStr | None = None
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0)
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0)
    logit_bias: dict[str, Any] | None = Field(None, max_length=0)  # only an empty one
    dharma: DharmaOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 stop sequences, none empty")
        return stops

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)

    def turns(self) -> list[dict[str, str]]:
        """The messages as template turns; roles out of order are an error naming the message."""
        turns = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]
        start = 1 if turns[0]["role"] == "system" else 0
        for index, turn in enumerate(turns[start:], start):
            expected = "user" if (index - start) % 2 == 0 else "assistant"
            if turn["role"] != expected:
                raise APIError(
                    400,
                    f"messages[{index}] has role '{turn['role']}' where '{expected}' is expected: after an "
                    "optional system message, user and assistant turns alternate, starting with user",
                    param=f"messages.{index}.role",
                    code="invalid_role_order",
                )
        if turns[-1]["role"] != "user":
            raise APIError(
                400, "the last message must be the user's", param="messages", code="invalid_role_order"
            )
        return turns


class CompletionRequest(Generation):
    prompt: StrictStr | list[StrictStr] = Field(min_length=1)
    echo: StrictBool = False

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise APIError(400, "one prompt per request", param="prompt", code="invalid_value")
            return self.prompt[0]
        return self.prompt


class PredictRequest(Body):
    """``dharma predict``'s record: ``text`` fills the head's first input, ``inputs`` any field."""

    model: StrictStr
    head: StrictStr | None = None
    text: StrictStr | None = None
    question: StrictStr | None = None
    context: StrictStr | None = None
    inputs: dict[str, StrictStr] = Field(default_factory=dict)
