"""The OpenAI request bodies ``cmiguard serve`` accepts, and its error.

What the server does not do is declared (``logit_bias``) so that asking for
it fails with a clear 400 instead of being ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


class StreamOptions(BaseModel):
    include_usage: bool = False


class Options(BaseModel):
    """What both endpoints share. ``logit_bias`` is declared so that asking
    for it fails clearly instead of being ignored."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    def checked_stops(self) -> tuple[str, ...]:
        """Refuse ``logit_bias``; the stop sequences (at most ``MAX_STOPS``, none empty)."""
        if self.logit_bias:
            # biasing chosen tokens to the top reads the full logit vector out of
            # a top-k API, a few tokens per query (Carlini et al. 2024)
            raise ApiError(400, "logit_bias is not supported by this server", "unsupported")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if len(stops) > MAX_STOPS or not all(stops):
            raise ApiError(
                400, f"stop takes up to {MAX_STOPS} non-empty strings", "invalid_request"
            )
        return tuple(stops)


class CompletionRequest(Options):
    # text or token ids (scored exactly as given, with no re-tokenisation),
    # or a list of either: a job per prompt, choices numbered prompt by prompt
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    # sample best_of choices, return the n with the highest log-prob per token
    best_of: int | None = Field(None, ge=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Options):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
