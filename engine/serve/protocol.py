"""The OpenAI request bodies ``cmiguard serve`` accepts, and its error.

Every field is checked here, before a request reaches a batch: numbers in
range and finite, strings valid Unicode (no lone surrogates), stop sequences
bounded. Fields the server does not honour are refused by name instead of
being ignored: ``logit_bias`` (it reads whole logit vectors out of a top-k
API), the samplers it does not implement, tools and response formats, and
any field it does not know.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    model_validator,
)

MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4
MAX_STOP_CHARS = 256
# below this a sampling temperature is greedy decoding: z / 1e-38 overflows
MIN_SAMPLING_TEMPERATURE = 1e-3
# known OpenAI / vLLM fields this server does not implement: refused by name
UNSUPPORTED = {
    "logit_bias": "it lets a client read whole logit vectors out of a top-k logprobs API",
    "suffix": "insertion is not implemented",
    "top_k": "only top_p sampling is implemented",
    "min_p": "only top_p sampling is implemented",
    "repetition_penalty": "use presence_penalty or frequency_penalty",
    "prompt_logprobs": "use echo=true with logprobs",
    "tools": "tool calls are not implemented",
    "tool_choice": "tool calls are not implemented",
    "functions": "function calls are not implemented",
    "function_call": "function calls are not implemented",
    "parallel_tool_calls": "tool calls are not implemented",
    "response_format": "structured output is not implemented",
    "guided_json": "structured output is not implemented",
    "audio": "audio is not implemented",
    "modalities": "only text is implemented",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind
        self.param = param

    def body(self) -> dict[str, Any]:
        """The OpenAI error shape."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def _valid_unicode(text: str) -> str:
    """No lone UTF-16 surrogates (JSON can carry them; a tokenizer cannot encode them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode: {exc.reason} at position {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
Stop = Annotated[
    str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_valid_unicode)
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Options(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: Text
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # what torch.manual_seed takes
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: Stop | list[Stop] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # accepted and not used: who the request is for, as OpenAI's clients send it
    user: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in UNSUPPORTED.items():
                if data.get(name) not in (None, {}, []):
                    raise ApiError(
                        400,
                        f"{name} is not supported by this server: {why}",
                        "unsupported",
                        param=name,
                    )
        return data

    def checked_stops(self) -> tuple[str, ...]:
        """The stop sequences (at most ``MAX_STOPS``)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if len(stops) > MAX_STOPS:
            raise ApiError(
                400, f"stop takes up to {MAX_STOPS} strings", "invalid_request", param="stop"
            )
        return tuple(stops)

    def sampling_temperature(self) -> float:
        """0 (greedy) below :data:`MIN_SAMPLING_TEMPERATURE`."""
        return self.temperature if self.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0


def _token_ids(x: Any) -> bool:
    return isinstance(x, list) and all(type(t) is int for t in x)  # not True / 5.0


def _prompt_form(prompt: Any) -> Any:
    """Name the forms a prompt may take, rather than the first one pydantic tried."""
    if isinstance(prompt, str) or _token_ids(prompt):
        return prompt
    if isinstance(prompt, list) and (
        all(isinstance(p, str) for p in prompt) or all(_token_ids(p) for p in prompt)
    ):
        return prompt
    raise ValueError(
        "must be a string, a list of token ids (integers), or a list of strings "
        "or of token-id lists"
    )


class CompletionRequest(Options):
    # text or token ids (scored exactly as given, with no re-tokenisation),
    # or a list of either: a job per prompt, choices numbered prompt by prompt
    prompt: Annotated[
        Text | list[StrictInt] | list[Text] | list[list[StrictInt]], BeforeValidator(_prompt_form)
    ]
    max_tokens: int = Field(16, ge=0, lt=2**31)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    # sample best_of choices, return the n with the highest log-prob per token
    best_of: int | None = Field(None, ge=1, le=128)


def _content_text(content: Any) -> Any:
    """OpenAI's content parts (what its newer clients send) as one string, the
    text parts joined by newlines as vLLM joins them; any other part is refused
    by its type."""
    if isinstance(content, str):
        return content  # checked as Text
    if not isinstance(content, list):
        raise ValueError("must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise ValueError(f"part {i} has type {kind!r}: this server takes text parts only")
        if kind != "text" or set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise ValueError(f'part {i} must be {{"type": "text", "text": "..."}}')
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # "developer" is OpenAI's newer name for system instructions; chat templates know "system"
    role: Annotated[
        Literal["system", "developer", "user", "assistant"],
        AfterValidator(lambda role: "system" if role == "developer" else role),
    ]
    content: Annotated[Text, BeforeValidator(_content_text)]
    name: Text | None = None


class ChatRequest(Options):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, lt=2**31)
    max_completion_tokens: int | None = Field(None, ge=1, lt=2**31)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def reply_tokens(self) -> int:
        """``max_completion_tokens``, else ``max_tokens``, else 16."""
        for value in (self.max_completion_tokens, self.max_tokens):
            if value is not None:
                return value
        return 16
