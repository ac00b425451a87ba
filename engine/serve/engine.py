"""The server's generation worker: requests queue (bounded) and run in
batches through ``generate()``, a row per choice.

Requests with the same sampling settings share a batch; each step's logits
go through the transform before anything (sampling, ``logprobs``,
``top_logprobs``) sees them. A streamed request's pieces are handed to it as
the batch runs. A request that times out or whose client leaves is
abandoned: its rows stop within one decoding step, and a batch whose rows
are all abandoned ends. A batch that fails is run again a request at a
time, so a bad request fails alone. With a folded model the transform is
already in the LM head and the worker runs with ``transform=None``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria

from cmiguard.serve.generation import purify_padded
from cmiguard.serve.metrics import ServerMetrics
from cmiguard.serve.protocol import ApiError
from cmiguard.serve.replies import Reply
from cmiguard.serve.token_bytes import token_bytes_of
from cmiguard.train.models import context_window
from cmiguard.transforms import LogitTransform

log = logging.getLogger(__name__)


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
    # the index of its first choice in the reply: a request with several
    # prompts is a job per prompt, streaming into one shared ``chunks``
    first_index: int = 0
    # set (from the event loop) when nobody waits for the result any more;
    # read by the worker thread between decoding steps
    abandoned: threading.Event = field(default_factory=threading.Event, repr=False)
    # a streamed job has had pieces sent: it cannot be run again
    streaming_started: bool = False

    def sampling(self) -> tuple[float, float, int | None]:
        """What a batch must share: one ``generate`` call samples every row alike."""
        return self.temperature, self.top_p, self.seed

    def abandon(self) -> None:
        """The client timed out or left: stop its rows, drop its result."""
        self.abandoned.set()
        self.future.cancel()


class Abandoned(StoppingCriteria):
    """Ends each row whose job was abandoned, at the next decoding step."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        done = [job.abandoned.is_set() for job in self.jobs]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


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


def check_api_key(key: str | None, name: str = "api_key") -> None:
    """None serves without a key; "" would too, silently, and a key with a
    newline or space is one no client can send in a header: both are refused."""
    if key is not None and (not key or any(c.isspace() or not c.isprintable() for c in key)):
        raise ValueError(
            f"{name} is empty or holds whitespace or control characters (leave it out to "
            "serve without a key)"
        )


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
    # a request body must arrive within this many seconds
    body_timeout_s: float = 30.0
    # echo=true with logprobs scores any text teacher-forced: the query a
    # distillation attacker makes, so a provider may turn it off
    echo: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_queue",
            "max_prompt_tokens",
            "max_new_tokens",
            "max_body_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("timeout_s", "body_timeout_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds")
        check_api_key(self.api_key)


class Engine:
    """One worker that drains the queue in batches and runs ``generate``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        transform: LogitTransform | None,
        config: ServerConfig,
        metrics: ServerMetrics | None = None,
    ):
        self.model = model
        self.context = context_window(model)
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes_of(tokenizer)
        self.transform = transform
        self.config = config
        self.metrics = metrics or ServerMetrics()
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=config.max_queue)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        # a reply ends at the model's end-of-turn token(s), as OpenAI's does
        self.eos_ids: set[int] = {eos} if isinstance(eos, int) else set(eos or ())
        self.worker: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batch_running = False

    def enqueue(self, jobs: list[Job]) -> None:
        """Queue a request's jobs: all of them, or none and a 429."""
        free = self.queue.maxsize - self.queue.qsize() if self.queue.maxsize else len(jobs)
        if free < len(jobs):
            raise ApiError(
                429, "the server is busy: request queue is full", "queue_full", "rate_limit"
            )
        for job in jobs:
            self.queue.put_nowait(job)
        self.metrics.queue_depth.set(self.queue.qsize())

    async def submit(self, jobs: list[Job]) -> list[list[dict[str, Any]]]:
        """Each job's choices' results, once all have run."""
        self.enqueue(jobs)
        done = asyncio.gather(*(asyncio.shield(j.future) for j in jobs))
        try:
            return await asyncio.wait_for(done, self.config.timeout_s)
        except TimeoutError as exc:
            for job in jobs:
                job.abandon()
            raise ApiError(504, "generation timed out", "timeout", "server_error") from exc
        except asyncio.CancelledError:  # the client left
            for job in jobs:
                job.abandon()
            raise

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch, rest, rows = [first], [], first.n
            while not self.queue.empty() and rows < self.config.max_batch:
                job = self.queue.get_nowait()
                fits = job.sampling() == first.sampling() and rows + job.n <= self.config.max_batch
                fits = fits and self._within_context([*batch, job])
                (batch if fits else rest).append(job)
                rows += job.n if fits else 0
            for job in rest:  # other settings, too many rows or positions: the next round
                self.queue.put_nowait(job)
            self.metrics.queue_depth.set(self.queue.qsize())
            batch = [j for j in batch if not j.abandoned.is_set()]
            if batch:
                await self._run(batch)

    def _within_context(self, batch: list[Job]) -> bool:
        """Whether every row of the batch stays within the model's positions: a
        row runs for the batch's longest reply, from its own prompt's end."""
        if self.context is None:
            return True
        longest = max(len(j.prompt_ids) for j in batch)
        return longest + max(j.max_tokens for j in batch) <= self.context

    async def _run(self, batch: list[Job]) -> None:
        """One batch; if it fails, each request alone, so only a bad one fails."""
        self.batch_running = True
        try:
            results = await asyncio.to_thread(self.generate, batch)
        except Exception as exc:
            # a stream that has pieces out cannot start again: it gets the error
            again = [j for j in batch if not j.streaming_started] if len(batch) > 1 else []
            if again:
                self.metrics.batches.labels("split").inc()
                for job in again:
                    await self._run([job])
            failed = [j for j in batch if j not in again]
            if failed:
                log.exception("a request failed")
                self.metrics.batches.labels("failed").inc()
            for job in failed:
                if job.chunks is not None:
                    job.chunks.put_nowait(("error", exc))
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self.batch_running = False
        self.metrics.batches.labels("ok").inc()
        for job, result in zip(batch, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)
            generated = sum(r["completion_tokens"] for r in result)
            self.metrics.tokens.labels("prompt").inc(len(job.prompt_ids))
            self.metrics.tokens.labels("completion").inc(generated)

    @torch.no_grad()
    def generate(self, batch: list[Job]) -> list[list[dict[str, Any]]]:
        """Run one batch, a row per choice: each job's choices' results; a
        streamed job's pieces go to its ``chunks`` as its tokens come."""
        # each row's job, and the index of its choice in the reply
        jobs = [job for job in batch for _ in range(job.n)]
        index = [job.first_index + i for job in batch for i in range(job.n)]
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

        echoed = {}  # row -> the prompt's logprobs entries; all before any piece is sent
        for row, job in enumerate(jobs):
            if job.echo is not None:
                again = row > 0 and jobs[row - 1] is job
                echoed[row] = echoed[row - 1] if again else self._prompt_entries(job, device)
        for row, entries in echoed.items():
            if jobs[row].chunks is not None:  # the prompt is each choice's first piece
                self._put(jobs[row], ("delta", index[row], jobs[row].echo, entries))
        ended: set[int] = set()

        def result(row: int) -> dict[str, Any]:
            out = replies[row].result()
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
                stopping_criteria=[Abandoned(jobs)],
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
        ids = job.prompt_ids
        first = self._token(ids[0], None) | {"top": None}
        if len(ids) == 1:  # nothing before the first token to predict it from
            return [first]
        logits = self.model(torch.tensor([ids], device=device)).logits[0, :-1]
        logprobs = torch.log_softmax(served(logits, self.transform).float(), dim=-1).cpu()
        chosen = logprobs.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()
        top = [[] for _ in chosen]
        if job.top_logprobs:
            values, tokens = logprobs.topk(job.top_logprobs, dim=-1)
            top = [self._top(v, t) for v, t in zip(values, tokens, strict=True)]
        return [first] + [
            self._token(t, lp) | {"top": tp} for t, lp, tp in zip(ids[1:], chosen, top, strict=True)
        ]

    def _put(self, job: Job, item: tuple) -> None:
        """Hand a piece to the request from the worker thread."""
        job.streaming_started = True
        self.loop.call_soon_threadsafe(job.chunks.put_nowait, item)

    def _entry(
        self, job: Job, capture: CaptureLogits, step: int, row: int, token: int
    ) -> dict[str, Any]:
        """A token's logprobs entry from its row of the batch (top-k sorted, so
        the job's own ``top_logprobs`` are the first of the batch's largest ``k``)."""
        top = []
        if job.top_logprobs:
            values, ids = capture.top[step]
            top = self._top(values[row, : job.top_logprobs], ids[row, : job.top_logprobs])
        return self._token(token, float(capture.chosen[step][row])) | {"top": top}

    def _top(self, values: Tensor, ids: Tensor) -> list[dict[str, Any]]:
        """One row's top log-probs, each as :meth:`_token` gives it."""
        return [self._token(t, v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)]

    def _token(self, token: int, logprob: float | None) -> dict[str, Any]:
        """A token's text (which is U+FFFD for part of a character), its UTF-8
        bytes (which are not) and its served log-prob."""
        text = self.tokenizer.decode([token])
        return {"token": text, "bytes": self.token_bytes(token), "logprob": logprob}
