"""``cmiguard serve``: an OpenAI-compatible completions server whose logprobs are purified.

Requests queue (bounded) for a single generation worker that batches those
with the same sampling settings; each step's logits go through the transform
before anything (sampling, ``logprobs``, ``top_logprobs``) sees them. A
streamed request gets its reply as server-sent events while the batch runs.
``echo`` scores the prompt teacher-forced, with the same purified log-probs.
With a folded model the transform is already in the LM head and the server
runs with ``transform=None``. Bad requests get OpenAI-style 4xx errors, never
500; a failed batch answers 500 (streamed: an error event) and is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from cmiguard.generation import purify_padded
from cmiguard.replies import Reply
from cmiguard.transforms import LogitTransform

MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4
log = logging.getLogger(__name__)


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

    def unsupported(self) -> str | None:
        """The first thing asked for that this server does not do, if any."""
        if self.logit_bias:
            # biasing chosen tokens to the top reads the full logit vector out of
            # a top-k API, a few tokens per query (Carlini et al. 2024)
            return "logit_bias"
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
    # streamed: each choice's pieces, ("delta", index, text, entries) then
    # ("end", index, result), or ("error", exception), put here as the batch runs
    chunks: asyncio.Queue | None = field(default=None, repr=False)
    # echo: the prompt's text, sent back before the reply with its tokens' logprobs
    echo: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1  # choices: rows of the same batch, so a seed gives n different samples

    def sampling(self) -> tuple[float, float, int | None]:
        """What a batch must share: one ``generate`` call samples every row alike."""
        return self.temperature, self.top_p, self.seed


class CaptureLogits(LogitsProcessor):
    """Purify (when a transform is set) and keep what the reply needs of each
    step: its top-``k`` log-probs, and the chosen token's log-prob once the next
    step (or :meth:`settle` at the end) shows which token was chosen, and
    then hand ``on_token(step, tokens)`` those tokens. Only one step's
    ``[B, V]`` log-probs is ever held, not ``[B, steps, V]``."""

    def __init__(
        self,
        transform: LogitTransform | None,
        top_k: int,
        on_token: Callable[[int, Tensor], None] | None = None,
    ) -> None:
        self.transform, self.top_k, self.on_token = transform, top_k, on_token
        self.last: Tensor | None = None
        self.chosen: list[Tensor] = []  # per step, [B]
        self.top: list[tuple[Tensor, Tensor]] = []  # per step, ([B, k], [B, k])

    def settle(self, tokens: Tensor) -> None:
        """Record the log-probs of ``tokens`` ([B]), the tokens the last step chose."""
        if self.last is not None:
            self.chosen.append(self.last.gather(1, tokens[:, None]).squeeze(1).cpu())
            self.last = None
            if self.on_token is not None:
                self.on_token(len(self.chosen) - 1, tokens.cpu())

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.settle(input_ids[:, -1])
        scores = served(scores, self.transform)
        self.last = torch.log_softmax(scores.float(), dim=-1)
        if self.top_k:
            values, ids = self.last.topk(self.top_k, dim=-1)
            self.top.append((values.cpu(), ids.cpu()))
        return scores


class Penalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, one pair per row, on the
    tokens each reply has generated (not its prompt): ``z_j - c_j·frequency -
    [c_j > 0]·presence`` for a token generated ``c_j`` times. They run after
    the purification, so they change what is sampled, not the logprobs a
    reply reports (as vLLM's default raw logprobs)."""

    def __init__(self, presence: Tensor, frequency: Tensor, prompt_width: int) -> None:
        self.presence, self.frequency, self.width = presence, frequency, prompt_width

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        generated = input_ids[:, self.width :]
        ones = torch.ones(generated.shape, dtype=scores.dtype, device=scores.device)
        counts = torch.zeros_like(scores).scatter_add_(1, generated, ones)
        presence = self.presence.to(scores)[:, None]
        frequency = self.frequency.to(scores)[:, None]
        return scores - counts * frequency - (counts > 0).to(scores) * presence


def served(scores: Tensor, transform: LogitTransform | None) -> Tensor:
    """The logits everything a client sees comes from: purified when a transform is set."""
    return scores if transform is None else purify_padded(scores, transform, None)


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
    # echo=true with logprobs scores any text teacher-forced: the query a
    # distillation attacker makes, so a provider may turn it off
    echo: bool = True


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
        self.loop: asyncio.AbstractEventLoop | None = None

    def enqueue(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull as exc:
            raise ApiError(
                429, "the server is busy: request queue is full", "queue_full", "rate_limit"
            ) from exc

    async def submit(self, job: Job) -> list[dict[str, Any]]:
        self.enqueue(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.config.timeout_s)
        except TimeoutError as exc:
            job.future.cancel()
            raise ApiError(504, "generation timed out", "timeout", "server_error") from exc

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch, rest, rows = [first], [], first.n
            while not self.queue.empty() and rows < self.config.max_batch:
                job = self.queue.get_nowait()
                fits = job.sampling() == first.sampling() and rows + job.n <= self.config.max_batch
                (batch if fits else rest).append(job)
                rows += job.n if fits else 0
            for job in rest:  # other sampling settings, or too many rows: the next round
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
                log.exception("a batch of %d requests failed", len(batch))
                for job in batch:
                    if job.chunks is not None:
                        job.chunks.put_nowait(("error", exc))
                    if not job.future.done():
                        job.future.set_exception(exc)

    @torch.no_grad()
    def generate(self, batch: list[Job]) -> list[list[dict[str, Any]]]:
        """Run one batch, a row per choice: each job's choices' results; a
        streamed job's pieces go to its ``chunks`` as its tokens come."""
        jobs = [job for job in batch for _ in range(job.n)]  # the job of each row
        index = [i for job in batch for i in range(job.n)]  # its choice's index
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, job in enumerate(jobs):  # left padding: every prompt ends at the same column
            ids[row, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids) :] = 1
        device = next(self.model.parameters()).device
        decode = self.tokenizer.decode
        replies = [
            Reply(j.stop, j.max_tokens, j.chunks is not None, decode, self.eos_ids) for j in jobs
        ]

        echoed = {}  # row -> the prompt's logprobs entries
        for row, job in enumerate(jobs):
            if job.echo is not None:
                echoed[row] = echoed[row - 1] if index[row] else self._prompt_entries(job, device)
                if job.chunks is not None:  # the prompt is each choice's first piece
                    self._put(job, ("delta", index[row], job.echo, echoed[row]))
        ended: set[int] = set()

        def result(row: int) -> dict[str, Any]:
            out = replies[row].result() | {"prompt_tokens": len(jobs[row].prompt_ids)}
            if row in echoed and jobs[row].chunks is None:
                out["text"] = jobs[row].echo + out["text"]
                out["entries"] = echoed[row] + out["entries"]
            return out

        def stream(row: int) -> None:
            """A streamed choice's new pieces, and its end as soon as it has one."""
            job, reply = jobs[row], replies[row]
            if job.chunks is None or row in ended:
                return
            text, entries = reply.take()
            if text or entries:
                self._put(job, ("delta", index[row], text, entries))
            if reply.finish is not None:
                ended.add(row)
                self._put(job, ("end", index[row], result(row)))

        def on_token(step: int, tokens: Tensor) -> None:
            for row, (job, reply) in enumerate(zip(jobs, replies, strict=True)):
                token = int(tokens[row])
                reply.add(token, functools.partial(self._entry, job, capture, step, row, token))
                stream(row)

        capture = CaptureLogits(self.transform, max(j.top_logprobs for j in jobs), on_token)
        processors = LogitsProcessorList([capture])
        if any(j.presence_penalty or j.frequency_penalty for j in jobs):
            presence = torch.tensor([j.presence_penalty for j in jobs])
            frequency = torch.tensor([j.frequency_penalty for j in jobs])
            processors.append(Penalties(presence, frequency, width))
        steps = max(j.max_tokens for j in jobs)
        if steps > 0:
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
                logits_processor=processors,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids) or None,
            )
            capture.settle(out[:, -1])
        for row, reply in enumerate(replies):
            reply.close()
            stream(row)
        results = iter([result(row) for row in range(len(jobs))])
        return [[next(results) for _ in range(job.n)] for job in batch]

    def _prompt_entries(self, job: Job, device: torch.device) -> list[dict[str, Any]]:
        """The logprobs entries of an echoed prompt: each token's served log-prob
        given the tokens before it (the first token has none, as OpenAI's)."""
        ids, decode = job.prompt_ids, self.tokenizer.decode
        logits = self.model(torch.tensor([ids], device=device)).logits[0, :-1]
        logprobs = torch.log_softmax(served(logits, self.transform).float(), dim=-1).cpu()
        chosen = logprobs.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()
        top = [[] for _ in chosen]
        if job.top_logprobs:
            values, tokens = logprobs.topk(job.top_logprobs, dim=-1)
            top = [
                [(decode([t]), v) for t, v in zip(ts, vs, strict=True)]
                for ts, vs in zip(tokens.tolist(), values.tolist(), strict=True)
            ]
        first = {"token": decode([ids[0]]), "logprob": None, "top": None}
        return [first] + [
            {"token": decode([t]), "logprob": lp, "top": tp}
            for t, lp, tp in zip(ids[1:], chosen, top, strict=True)
        ]

    def _put(self, job: Job, item: tuple) -> None:
        """Hand a piece to the request from the worker thread."""
        self.loop.call_soon_threadsafe(job.chunks.put_nowait, item)

    def _entry(
        self, job: Job, capture: CaptureLogits, step: int, row: int, token: int
    ) -> dict[str, Any]:
        """A token's logprobs entry from its row of the batch (top-k sorted, so
        the job's own ``top_logprobs`` are the first of the batch's largest ``k``)."""
        decode = self.tokenizer.decode
        top = []
        if job.top_logprobs:
            values, ids = capture.top[step]
            pairs = zip(values[row, : job.top_logprobs], ids[row, : job.top_logprobs], strict=True)
            top = [(decode([int(t)]), float(v)) for v, t in pairs]
        return {"token": decode([token]), "logprob": float(capture.chosen[step][row]), "top": top}


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

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:
        # the cause is logged, not handed to clients
        return error(500, "generation failed", "internal_error", "server_error")

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
        if not prompt_ids:
            raise ApiError(400, "prompt is empty", "invalid_request")
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

    def new_job(
        req: Options,
        prompt_ids: list[int],
        max_tokens: int,
        top: int,
        echo: str | None = None,
        rows: int | None = None,
    ) -> Job:
        """``rows`` choices are sampled (``n`` unless ``best_of`` asks for more)."""
        stops = req.checked_stops()
        rows = rows or req.n
        if rows > config.max_batch:
            raise ApiError(
                400,
                f"n={rows} is over this server's batch of {config.max_batch}",
                "invalid_request",
            )
        future = asyncio.get_running_loop().create_future()
        chunks = asyncio.Queue() if req.stream else None
        return Job(
            prompt_ids,
            max_tokens,
            req.temperature,
            top,
            req.seed,
            future,
            stops,
            req.top_p,
            chunks,
            echo,
            req.presence_penalty,
            req.frequency_penalty,
            rows,
        )

    Choice = Callable[[int, str, list[dict], str | None, bool], dict[str, Any]]
    # id prefix, object, object of a streamed piece
    kinds = {
        "completion": ("cmpl", "text_completion", "text_completion"),
        "chat": ("chatcmpl", "chat.completion", "chat.completion.chunk"),
    }

    async def answer(req: Options, job: Job, kind: str, choice: Choice) -> Any:
        """The whole reply, or (``stream``) its pieces as server-sent events;
        ``choice(index, text, entries, finish_reason, streamed)`` shapes one choice."""
        prefix, whole, piece = kinds[kind]
        head = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": whole,
            "created": int(time.time()),
            "model": config.model_name,
        }
        if not req.stream:
            results = await engine.submit(job)
            # best_of: the n best choices, in the order they were sampled
            best = sorted(results, key=_per_token, reverse=True)[: req.n]
            kept = [r for r in results if any(r is b for b in best)]
            choices = [
                choice(i, r["text"], r["entries"], r["finish_reason"], False)
                for i, r in enumerate(kept)
            ]
            return head | {"choices": choices, "usage": _usage(results)}
        engine.enqueue(job)
        usage = req.stream_options is not None and req.stream_options.include_usage
        head["object"] = piece
        return StreamingResponse(events(job, head, choice, usage), media_type="text/event-stream")

    async def events(job: Job, head: dict, choice: Choice, usage: bool) -> AsyncIterator[str]:
        results = []
        try:
            while True:
                try:
                    kind, *data = await asyncio.wait_for(job.chunks.get(), config.timeout_s)
                except TimeoutError:
                    kind, data = (
                        "error",
                        [ApiError(504, "generation timed out", "timeout", "server_error")],
                    )
                if kind == "error":
                    err = data[0]
                    if not isinstance(err, ApiError):
                        err = ApiError(500, "generation failed", "internal_error", "server_error")
                    yield _event(
                        {"error": {"message": err.message, "type": err.kind, "code": err.code}}
                    )
                    return
                if kind == "delta":
                    yield _event(head | {"choices": [choice(*data, None, True)]})
                    continue
                index, result = data
                results.append(result)
                finish = choice(index, "", [], result["finish_reason"], True)
                yield _event(head | {"choices": [finish]})
                if len(results) < job.n:
                    continue
                if usage:
                    yield _event(head | {"choices": [], "usage": _usage(results)})
                yield "data: [DONE]\n\n"
                return
        finally:
            job.future.cancel()  # a client that left before its batch ran is skipped

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "owned_by": "cmiguard"}],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        prompt_ids = tokenizer.encode(req.prompt, add_special_tokens=False)
        check(req.model, prompt_ids, req.max_tokens)
        if req.echo and not config.echo:
            raise ApiError(400, "echo=true is turned off on this server", "unsupported")
        echo = req.prompt if req.echo else None
        best_of = req.best_of or req.n
        if best_of < req.n or (req.stream and best_of > req.n):
            raise ApiError(
                400, "best_of must be >= n, and equal to it to stream", "invalid_request"
            )
        job = new_job(req, prompt_ids, req.max_tokens, req.logprobs or 0, echo, best_of)
        offsets = [0 if req.echo else len(req.prompt)] * req.n  # of each choice's next token

        def choice(i: int, text: str, entries: list[dict], finish: str | None, _: bool) -> dict:
            logprobs = None
            if req.logprobs is not None:
                starts = list(
                    itertools.accumulate((len(e["token"]) for e in entries), initial=offsets[i])
                )
                offsets[i] = starts.pop()
                logprobs = {
                    "tokens": [e["token"] for e in entries],
                    "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [None if e["top"] is None else dict(e["top"]) for e in entries],
                    "text_offset": starts,
                }
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

        return await answer(req, job, "completion", choice)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:
        messages = [m.model_dump() for m in req.messages]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens or 16
        check(req.model, prompt_ids, max_tokens)
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "invalid_request")
        job = new_job(req, prompt_ids, max_tokens, req.top_logprobs or 0)
        started: set[int] = set()

        def choice(
            i: int, text: str, entries: list[dict], finish: str | None, streamed: bool
        ) -> dict:
            logprobs = {"content": [_chat_entry(e) for e in entries]} if req.logprobs else None
            if streamed:  # the role comes with each choice's first piece
                message = ({} if i in started else {"role": "assistant"}) | (
                    {"content": text} if text else {}
                )
                started.add(i)
            else:
                message = {"role": "assistant", "content": text}
            key = "delta" if streamed else "message"
            return {"index": i, key: message, "logprobs": logprobs, "finish_reason": finish}

        return await answer(req, job, "chat", choice)

    return app


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _chat_entry(e: dict[str, Any]) -> dict[str, Any]:
    return {
        "token": e["token"],
        "logprob": e["logprob"],
        "bytes": list(e["token"].encode()),
        "top_logprobs": [
            {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in e["top"]
        ],
    }


def _per_token(result: dict[str, Any]) -> float:
    """A choice's mean log-prob per generated token (what ``best_of`` ranks by)."""
    n = result["completion_tokens"]
    generated = result["entries"][len(result["entries"]) - n :]
    return sum(e["logprob"] for e in generated) / max(n, 1)


def _usage(results: list[dict[str, Any]]) -> dict[str, int]:
    """The prompt counts once, as OpenAI counts it, however many choices."""
    p, c = results[0]["prompt_tokens"], sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
