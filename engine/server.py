"""``cmiguard serve``: an OpenAI-compatible completions server whose logprobs are purified.

Requests queue (bounded) for a single generation worker that batches those
with the same sampling settings; each step's logits go through the transform
before anything (sampling, ``logprobs``, ``top_logprobs``) sees them. With a
folded model the transform is already in the LM head and the server runs
with ``transform=None``. Bad requests get OpenAI-style 4xx errors, never 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from cmiguard.generation import purify_padded
from cmiguard.transforms import LogitTransform

MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


class Options(BaseModel):
    """What both endpoints share. ``stream``, ``n``, ``logit_bias`` and the
    penalties are declared so that asking for what this server does not do
    fails clearly instead of being ignored."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    def unsupported(self) -> str | None:
        """The first thing asked for that this server does not do, if any."""
        if self.stream:
            return "stream=true"
        if self.n != 1:
            return f"n={self.n} (one choice per request)"
        if self.logit_bias:
            # biasing chosen tokens to the top reads the full logit vector out of
            # a top-k API, a few tokens per query (Carlini et al. 2024)
            return "logit_bias"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty other than 0"
        return None

    def checked_stops(self) -> tuple[str, ...]:
        """Refuse what this server does not do; the stop sequences (at most
        ``MAX_STOPS``, none empty)."""
        if what := self.unsupported():
            raise ApiError(400, f"{what} is not supported by this server", "unsupported")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if len(stops) > MAX_STOPS or not all(stops):
            raise ApiError(
                400, f"stop takes up to {MAX_STOPS} non-empty strings", "invalid_request"
            )
        return tuple(stops)


class CompletionRequest(Options):
    prompt: str
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo=true"
        if self.best_of not in (None, 1):
            return f"best_of={self.best_of}"
        return super().unsupported()


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Options):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_logprobs: int
    seed: int | None
    future: asyncio.Future = field(repr=False)
    stop: tuple[str, ...] = ()
    top_p: float = 1.0

    def sampling(self) -> tuple[float, float, int | None]:
        """What a batch must share: one ``generate`` call samples every row alike."""
        return self.temperature, self.top_p, self.seed


class CaptureLogits(LogitsProcessor):
    """Purify (when a transform is set) and keep what the reply needs of each
    step: its top-``k`` log-probs, and the chosen token's log-prob once the next
    step (or :meth:`settle` at the end) shows which token was chosen. Only one
    step's ``[B, V]`` log-probs is ever held, not ``[B, steps, V]``."""

    def __init__(self, transform: LogitTransform | None, top_k: int) -> None:
        self.transform, self.top_k = transform, top_k
        self.last: Tensor | None = None
        self.chosen: list[Tensor] = []  # per step, [B]
        self.top: list[tuple[Tensor, Tensor]] = []  # per step, ([B, k], [B, k])

    def settle(self, tokens: Tensor) -> None:
        """Record the log-probs of ``tokens`` ([B]), the tokens the last step chose."""
        if self.last is not None:
            self.chosen.append(self.last.gather(1, tokens[:, None]).squeeze(1).cpu())
            self.last = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.settle(input_ids[:, -1])
        if self.transform is not None:
            scores = purify_padded(scores, self.transform, None)
        self.last = torch.log_softmax(scores.float(), dim=-1)
        if self.top_k:
            values, ids = self.last.topk(self.top_k, dim=-1)
            self.top.append((values.cpu(), ids.cpu()))
        return scores


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 256
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    timeout_s: float = 60.0
    max_body_bytes: int = 1 << 20


class Engine:
    """One worker that drains the queue in batches and runs ``generate``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        transform: LogitTransform | None,
        config: ServerConfig,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.config = config
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=config.max_queue)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        # a reply ends at the model's end-of-turn token(s), as OpenAI's does
        self.eos_ids: set[int] = {eos} if isinstance(eos, int) else set(eos or ())
        self.worker: asyncio.Task | None = None

    async def submit(self, job: Job) -> dict[str, Any]:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull as exc:
            raise ApiError(
                429, "the server is busy: request queue is full", "queue_full", "rate_limit"
            ) from exc
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.config.timeout_s)
        except TimeoutError as exc:
            job.future.cancel()
            raise ApiError(504, "generation timed out", "timeout", "server_error") from exc

    async def run(self) -> None:
        while True:
            first = await self.queue.get()
            batch, rest = [first], []
            while not self.queue.empty() and len(batch) < self.config.max_batch:
                job = self.queue.get_nowait()
                same = job.sampling() == first.sampling()
                (batch if same else rest).append(job)
            for job in rest:  # other sampling settings wait for the next round
                self.queue.put_nowait(job)
            batch = [j for j in batch if not j.future.cancelled()]
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.generate, batch)
                for job, result in zip(batch, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)
            except Exception as exc:  # a failed batch answers every request in it
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    @torch.no_grad()
    def generate(self, batch: list[Job]) -> list[dict[str, Any]]:
        width = max(len(j.prompt_ids) for j in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, job in enumerate(batch):  # left padding: every prompt ends at the same column
            ids[i, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids) :] = 1
        device = next(self.model.parameters()).device
        capture = CaptureLogits(self.transform, max(j.top_logprobs for j in batch))
        steps = max(j.max_tokens for j in batch)
        if steps == 0:
            return [self._result(j, [], capture, i) for i, j in enumerate(batch)]
        temperature, top_p = batch[0].temperature, batch[0].top_p
        if batch[0].seed is not None:
            torch.manual_seed(batch[0].seed)
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=steps,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=None,
            top_p=top_p if temperature > 0 and top_p < 1 else None,
            logits_processor=LogitsProcessorList([capture]),
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
        )
        capture.settle(out[:, -1])
        new = out[:, width:].cpu()
        return [self._result(j, new[i], capture, i) for i, j in enumerate(batch)]

    def _result(self, job: Job, tokens, capture: CaptureLogits, row: int) -> dict[str, Any]:
        """One request's reply from its row of the batch (top-k sorted, so its own
        ``top_logprobs`` are the first of the batch's largest ``k``), cut before
        its first end-of-turn token or stop sequence (``finish_reason`` "stop";
        the text keeps what precedes the stop sequence, the token list the
        tokens before the one it starts in)."""
        decode = self.tokenizer.decode
        tokens = [int(t) for t in tokens[: job.max_tokens]]
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        if end is not None:
            tokens = tokens[:end]
        text = decode(tokens)
        if any(s in text for s in job.stop):  # then find the token the first one starts in
            for k in range(len(tokens)):
                so_far = decode(tokens[: k + 1])
                found = [i for i in (so_far.find(s) for s in job.stop) if i >= 0]
                if found:
                    end, text, tokens = k, so_far[: min(found)], tokens[:k]
                    break
        entries = []
        for step, tok in enumerate(tokens):
            top = []
            if job.top_logprobs:
                values, ids = capture.top[step]
                pairs = zip(
                    values[row, : job.top_logprobs], ids[row, : job.top_logprobs], strict=True
                )
                top = [(decode([int(t)]), float(v)) for v, t in pairs]
            entries.append(
                {"token": decode([tok]), "logprob": float(capture.chosen[step][row]), "top": top}
            )
        return {
            "text": text,
            "entries": entries,
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(tokens),
            "finish_reason": "length" if end is None else "stop",
        }


def create_app(
    model: nn.Module, tokenizer: Any, transform: LogitTransform | None, config: ServerConfig
) -> FastAPI:
    """The FastAPI app; run it with uvicorn (``cmiguard serve`` does)."""
    engine = Engine(model.eval(), tokenizer, transform, config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.worker = asyncio.create_task(engine.run())
        yield
        engine.worker.cancel()

    app = FastAPI(title="cmiguard", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine

    def error(
        status: int, message: str, code: str, kind: str = "invalid_request_error"
    ) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": message, "type": kind, "code": code}}, status_code=status
        )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, exc.code, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(
            400, f"invalid request: {where} {first.get('msg', '')}".strip(), "invalid_request"
        )

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.api_key and request.headers.get("authorization") != f"Bearer {config.api_key}":
            return error(401, "missing or wrong API key", "invalid_api_key", "authentication_error")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > config.max_body_bytes:
            return error(413, f"request body over {config.max_body_bytes} bytes", "body_too_large")
        return await call_next(request)

    def check(model_name: str, prompt_ids: list[int], max_tokens: int) -> None:
        if model_name != config.model_name:
            raise ApiError(
                404,
                f"model {model_name!r} not found; this server has {config.model_name!r}",
                "model_not_found",
            )
        if len(prompt_ids) > config.max_prompt_tokens:
            raise ApiError(
                400,
                f"prompt has {len(prompt_ids)} tokens, the limit is {config.max_prompt_tokens}",
                "context_length_exceeded",
            )
        if max_tokens > config.max_new_tokens:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} is over the limit {config.max_new_tokens}",
                "max_tokens_too_large",
            )

    def new_job(req: Options, prompt_ids: list[int], max_tokens: int, top: int) -> Job:
        stops = req.checked_stops()
        future = asyncio.get_running_loop().create_future()
        return Job(prompt_ids, max_tokens, req.temperature, top, req.seed, future, stops, req.top_p)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "owned_by": "cmiguard"}],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> dict[str, Any]:
        prompt_ids = tokenizer.encode(req.prompt, add_special_tokens=False)
        check(req.model, prompt_ids, req.max_tokens)
        top = req.logprobs or 0
        result = await engine.submit(new_job(req, prompt_ids, req.max_tokens, top))
        logprobs = None
        if req.logprobs is not None:
            entries = result["entries"]
            offsets, pos = [], len(req.prompt)
            for e in entries:
                offsets.append(pos)
                pos += len(e["token"])
            logprobs = {
                "tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [dict(e["top"]) for e in entries],
                "text_offset": offsets,
            }
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": config.model_name,
            "choices": [
                {
                    "index": 0,
                    "text": result["text"],
                    "logprobs": logprobs,
                    "finish_reason": result["finish_reason"],
                }
            ],
            "usage": _usage(result),
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> dict[str, Any]:
        messages = [m.model_dump() for m in req.messages]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens or 16
        check(req.model, prompt_ids, max_tokens)
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "invalid_request")
        top = req.top_logprobs or 0
        result = await engine.submit(new_job(req, prompt_ids, max_tokens, top))
        logprobs = None
        if req.logprobs:
            logprobs = {
                "content": [
                    {
                        "token": e["token"],
                        "logprob": e["logprob"],
                        "bytes": list(e["token"].encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": v, "bytes": list(t.encode())}
                            for t, v in e["top"]
                        ],
                    }
                    for e in result["entries"]
                ]
            }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": config.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result["text"]},
                    "logprobs": logprobs,
                    "finish_reason": result["finish_reason"],
                }
            ],
            "usage": _usage(result),
        }

    return app


def _usage(result: dict[str, Any]) -> dict[str, int]:
    p, c = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
