"""``cmiguard serve``: an OpenAI-compatible completions server whose logprobs are purified.

The routes shape requests into jobs for the generation worker
(:mod:`cmiguard.serve.engine`) and its results into OpenAI replies: whole, or as
server-sent events while the batch runs. ``echo`` scores the prompt
teacher-forced, with the same purified log-probs. Every request is checked
before it reaches a batch (:mod:`cmiguard.serve.protocol`, and the body and
key in :mod:`cmiguard.serve.limits`); errors are OpenAI-shaped, bad input a
4xx, never a 5xx. Tokenising runs off the event loop; a request that times
out or whose client leaves stops its rows. ``/health``, ``/metrics``
(Prometheus) and ``/v1/models/{id}`` beside the two endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jinja2.exceptions import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from torch import nn

from cmiguard.serve.engine import Engine, Job, ServerConfig
from cmiguard.serve.limits import RequestGuard
from cmiguard.serve.metrics import ServerMetrics
from cmiguard.serve.protocol import ApiError, ChatRequest, CompletionRequest, Options
from cmiguard.transforms import LogitTransform

__all__ = ["ServerConfig", "create_app"]
# a prompt longer than this many characters per allowed token is refused untokenised
CHARS_PER_TOKEN = 64


def create_app(
    model: nn.Module, tokenizer: Any, transform: LogitTransform | None, config: ServerConfig
) -> FastAPI:
    """The FastAPI app; run it with uvicorn (``cmiguard serve`` does)."""
    metrics = ServerMetrics()
    engine = Engine(model.eval(), tokenizer, transform, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.worker = asyncio.create_task(engine.run())
        yield
        engine.worker.cancel()

    app = FastAPI(title="cmiguard", version="0.1.0", lifespan=lifespan)
    # ids both the tokenizer and the model's embedding know (they may differ)
    token_ids = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
    app.state.engine = engine

    def observe(path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        metrics.requests.labels(route, str(status)).inc()
        metrics.latency.labels(route).observe(seconds)

    app.add_middleware(
        RequestGuard,
        api_key=config.api_key,
        max_bytes=config.max_body_bytes,
        timeout_s=config.body_timeout_s,
        observe=observe,
    )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:  # the Responses API or embeddings, say: name what is served
            message = (
                f"no route {request.url.path}: this server serves POST /v1/completions and "
                "/v1/chat/completions, GET /v1/models"
            )
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(ApiError(exc.status_code, message, code).body(), exc.status_code)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:
        # the cause is logged, not handed to clients
        err = ApiError(500, "generation failed", "internal_error", "server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # a union reports each member it tried: the deepest error went furthest into
        # the value (["", "x"] as stop: its item 0 is empty, not "not a string")
        first = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={})
        loc = first.get("loc", ())
        where = _field_path(loc)
        what = first.get("msg", "").removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            what = "is not a field this server knows (refused rather than ignored)"
        if first.get("type") == "json_invalid":  # loc is ("body", character offset)
            error = first.get("ctx", {}).get("error", "")
            where, what = "", f"the body is not valid JSON: {error} at character {loc[-1]}"
        elif tuple(loc) == ("body",):  # the whole body: not an object, or not read as JSON
            sent = request.headers.get("content-type", "none")
            what = (
                "the body must be a JSON object"
                if sent.split(";")[0].strip() == "application/json"
                else f"send the body as JSON with Content-Type: application/json (got {sent})"
            )
        err = ApiError(
            400,
            " ".join(part for part in ("invalid request:", where, what) if part),
            "invalid_request",
            param=where or None,
        )
        return JSONResponse(err.body(), status_code=400)

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise ApiError(
                404,
                f"model {name!r} not found; this server has {config.model_name!r}",
                "model_not_found",
                param="model",
            )

    def check(prompt_ids: list[int], max_tokens: int, where: str = "prompt") -> None:
        if not prompt_ids:
            raise ApiError(400, f"{where} is empty", "invalid_request", param=where)
        if len(prompt_ids) > config.max_prompt_tokens:
            raise ApiError(
                400,
                f"{where} has {len(prompt_ids)} tokens, the limit is {config.max_prompt_tokens}",
                "context_length_exceeded",
                param=where,
            )
        if max_tokens > config.max_new_tokens:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} is over the limit {config.max_new_tokens}",
                "max_tokens_too_large",
                param="max_tokens",
            )
        if engine.context is not None and len(prompt_ids) + max_tokens > engine.context:
            raise ApiError(
                400,
                f"this model's context is {engine.context} tokens: the {where} has "
                f"{len(prompt_ids)} and max_tokens asks for {max_tokens} more",
                "context_length_exceeded",
                param=where,
            )

    def check_length(text: str, where: str) -> None:
        """Refuse a text too long to fit before spending time tokenising it."""
        if len(text) > CHARS_PER_TOKEN * config.max_prompt_tokens:
            raise ApiError(
                400,
                f"{where} has {len(text)} characters, over any {config.max_prompt_tokens} tokens",
                "context_length_exceeded",
                param=where,
            )

    def new_job(
        req: Options,
        prompt_ids: list[int],
        max_tokens: int,
        top: int,
        stops: tuple[str, ...],
        echo: str | None = None,
        rows: int | None = None,
        first_index: int = 0,
    ) -> Job:
        """``rows`` choices are sampled (``n`` unless ``best_of`` asks for more)."""
        rows = rows or req.n
        if rows > config.max_batch:
            raise ApiError(
                400,
                f"{rows} choices (n, best_of) are over this server's batch of {config.max_batch}",
                "invalid_request",
                param="n",
            )
        return Job(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=req.sampling_temperature(),
            top_logprobs=top,
            seed=req.seed,
            future=asyncio.get_running_loop().create_future(),
            stop=stops,
            top_p=req.top_p,
            echo=echo,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            n=rows,
            first_index=first_index,
        )

    Choice = Callable[[int, str, list[dict], str | None, bool], dict[str, Any]]
    # id prefix, object, object of a streamed piece
    kinds = {
        "completion": ("cmpl", "text_completion", "text_completion"),
        "chat": ("chatcmpl", "chat.completion", "chat.completion.chunk"),
    }

    async def answer(
        request: Request, req: Options, jobs: list[Job], kind: str, choice: Choice
    ) -> Any:
        """The whole reply, or (``stream``) its pieces as server-sent events;
        ``choice(index, text, entries, finish_reason, streamed)`` shapes one choice.
        A client that leaves abandons its jobs (a stream: when its response ends)."""
        prefix, whole, piece = kinds[kind]
        head = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": whole,
            "created": int(time.time()),
            "model": config.model_name,
        }
        if not req.stream:
            watcher = asyncio.create_task(_abandon_on_disconnect(request, jobs))
            try:
                per_job = await engine.submit(jobs)
            finally:
                watcher.cancel()
            choices = []
            for results in per_job:
                # best_of: the n best choices, in the order they were sampled
                best = sorted(results, key=_per_token, reverse=True)[: req.n]
                kept = [r for r in results if any(r is b for b in best)]
                choices += [
                    choice(len(choices) + k, r["text"], r["entries"], r["finish_reason"], False)
                    for k, r in enumerate(kept)
                ]
            usage = _usage(jobs, [r for results in per_job for r in results])
            return head | {"choices": choices, "usage": usage}
        chunks: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            job.chunks = chunks
        engine.enqueue(jobs)
        usage = req.stream_options is not None and req.stream_options.include_usage
        head["object"] = piece
        return StreamingResponse(
            events(jobs, chunks, head, choice, usage), media_type="text/event-stream"
        )

    async def events(
        jobs: list[Job], chunks: asyncio.Queue, head: dict, choice: Choice, usage: bool
    ) -> AsyncIterator[str]:
        results = []
        try:
            while True:
                try:
                    kind, *data = await asyncio.wait_for(chunks.get(), config.timeout_s)
                except TimeoutError:
                    kind, data = (
                        "error",
                        [ApiError(504, "generation timed out", "timeout", "server_error")],
                    )
                if kind == "error":
                    err = data[0]
                    if not isinstance(err, ApiError):
                        err = ApiError(500, "generation failed", "internal_error", "server_error")
                    yield _event(err.body())
                    return
                if kind == "delta":
                    yield _event(head | {"choices": [choice(*data, None, True)]})
                    continue
                index, result = data
                results.append(result)
                finish = choice(index, "", [], result["finish_reason"], True)
                yield _event(head | {"choices": [finish]})
                if len(results) < sum(j.n for j in jobs):
                    continue
                if usage:
                    yield _event(head | {"choices": [], "usage": _usage(jobs, results)})
                yield "data: [DONE]\n\n"
                return
        finally:
            for job in jobs:  # a client that left: its rows stop at the next step
                job.abandon()

    card = {"id": config.model_name, "object": "model", "owned_by": "cmiguard"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queue": engine.queue.qsize()}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return card

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest) -> Any:
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) or _ids(req.prompt) else req.prompt
        if not prompts:
            raise ApiError(400, "prompt is empty", "invalid_request", param="prompt")
        if len(prompts) > config.max_batch:
            raise ApiError(
                400,
                f"{len(prompts)} prompts are over this server's batch of {config.max_batch}",
                "invalid_request",
                param="prompt",
            )
        if req.echo and not config.echo:
            raise ApiError(
                400, "echo=true is turned off on this server", "unsupported", param="echo"
            )
        best_of = req.best_of or req.n
        if best_of < req.n or (req.stream and best_of > req.n):
            raise ApiError(
                400,
                "best_of must be >= n, and equal to it to stream",
                "invalid_request",
                param="best_of",
            )
        stops = req.checked_stops()
        jobs, offsets = [], {}  # offsets: of each choice's next token in its text
        for p, prompt in enumerate(prompts):
            text, prompt_ids = await text_and_ids(prompt)
            check(prompt_ids, req.max_tokens)
            echo = text if req.echo else None
            top = req.logprobs or 0
            jobs.append(
                new_job(req, prompt_ids, req.max_tokens, top, stops, echo, best_of, p * req.n)
            )
            offsets |= {p * req.n + k: 0 if req.echo else len(text) for k in range(req.n)}

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
                    "top_logprobs": [
                        None if e["top"] is None else {t["token"]: t["logprob"] for t in e["top"]}
                        for e in entries
                    ],
                    "text_offset": starts,
                }
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

        return await answer(request, req, jobs, "completion", choice)

    async def text_and_ids(prompt: str | list[int]) -> tuple[str, list[int]]:
        """A prompt's text and token ids, from either (tokenised off the event loop)."""
        if isinstance(prompt, str):
            check_length(prompt, "prompt")
            ids = await asyncio.to_thread(tokenizer.encode, prompt, add_special_tokens=False)
            return prompt, ids
        if len(prompt) > config.max_prompt_tokens:
            check(prompt, 0)  # too long: refused before decoding it
        if any(not 0 <= t < token_ids for t in prompt):
            raise ApiError(
                400,
                f"prompt token ids must be in [0, {token_ids})",
                "invalid_request",
                param="prompt",
            )
        return await asyncio.to_thread(tokenizer.decode, prompt), prompt

    @app.post("/v1/chat/completions")
    async def chat(request: Request, req: ChatRequest) -> Any:
        check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise ApiError(
                400, "top_logprobs needs logprobs=true", "invalid_request", param="top_logprobs"
            )
        stops = req.checked_stops()
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        check_length("".join(m["content"] for m in messages), "messages")

        def tokenize() -> list[int]:
            if not getattr(tokenizer, "chat_template", None):  # a base model's tokenizer
                raise ApiError(
                    400,
                    "this model has no chat template: use /v1/completions",
                    "no_chat_template",
                    param="messages",
                )
            try:  # a template may refuse messages (roles that do not alternate, a system role)
                prompt = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except TemplateError as exc:
                raise ApiError(
                    400,
                    f"the model's chat template refused these messages: {exc}",
                    "invalid_request",
                    param="messages",
                ) from None
            return tokenizer.encode(prompt, add_special_tokens=False)

        prompt_ids = await asyncio.to_thread(tokenize)
        max_tokens = req.reply_tokens()
        check(prompt_ids, max_tokens, "messages")
        job = new_job(req, prompt_ids, max_tokens, req.top_logprobs or 0, stops)
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

        return await answer(request, req, [job], "chat", choice)

    return app


# names pydantic gives the members of a union in an error's location
_UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple) -> str:
    """``stop.0``, ``messages.0.content``: an error's field, without the names of
    the union members pydantic tried (``function-after[...]``, ``list[int]``)."""
    parts = []
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int) or (part.isidentifier() and part not in _UNION_MEMBERS):
            parts.append(str(part))
    return ".".join(parts)


# the routes the metrics name; anything else counts as "other"
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


async def _abandon_on_disconnect(request: Request, jobs: list[Job]) -> None:
    """Abandon the jobs of a client that has left (its rows stop at the next step)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)
    for job in jobs:
        job.abandon()


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _chat_entry(e: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's chat logprobs entry: ``bytes`` rebuild a character split
    across tokens, which each token's text shows as U+FFFD."""
    return {
        "token": e["token"],
        "logprob": e["logprob"],
        "bytes": e["bytes"],
        "top_logprobs": e["top"],
    }


def _per_token(result: dict[str, Any]) -> float:
    """A choice's mean log-prob per generated token (what ``best_of`` ranks by)."""
    n = result["completion_tokens"]
    generated = result["entries"][len(result["entries"]) - n :]
    return sum(e["logprob"] for e in generated) / max(n, 1)


def _ids(prompt: list) -> bool:
    """Whether a list prompt is one prompt of token ids (not a list of prompts)."""
    return bool(prompt) and all(isinstance(t, int) for t in prompt)


def _usage(jobs: list[Job], results: list[dict[str, Any]]) -> dict[str, int]:
    """Each prompt counts once, as OpenAI counts it, however many choices."""
    p = sum(len(j.prompt_ids) for j in jobs)
    c = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
