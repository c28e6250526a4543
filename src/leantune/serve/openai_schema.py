"""Request bodies of the OpenAI-compatible routes, as pydantic models.

Only the parameters that ``leantune serve`` implements are accepted: an unknown field (``logprobs``,
``tools``, a typo) is a 400 naming it rather than being silently ignored (``extra="forbid"``). Types
are strict (``"max_tokens": "5"`` is refused; an integer where a float is expected is fine).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from leantune.serve.engine import SamplingParams

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "StreamOptions",
    "TextPart",
]

_STRICT = ConfigDict(extra="forbid", strict=True)

# OpenAI allows up to 4 stop sequences; so does leantune.
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class TextPart(BaseModel):
    """A ``{"type": "text", "text": ...}`` content part (text is all a causal LM reads)."""

    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        """``{"role", "content"}`` for the chat template; a developer message is a system one."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class _Sampling(BaseModel):
    """The parameters both routes share (OpenAI's defaults: temperature 1, top_p 1, n 1)."""

    model_config = _STRICT
    model: str | None = None  # accepted and echoed; the server has one model whatever it is called
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            stop=stop,
            seed=self.seed,
            n=self.n,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    # the newer name of max_tokens in OpenAI's API; either may be given
    max_completion_tokens: int | None = Field(None, ge=1)

    def sampling(self) -> SamplingParams:
        params = super().sampling()
        if params.max_tokens is None:
            params.max_tokens = self.max_completion_tokens
        return params


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings or a list of token ids."""

    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | Annotated[list[StrictInt], Field(min_length=1)]
    )
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this route
