"""The real openai client against a local ``cmiguard serve`` app (tiny model, real tokenizer)."""

import copy
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from cmiguard import LowRankTransform
from cmiguard.attack.defenses import defense_fn
from cmiguard.serve.engine import Engine, Job, Penalties
from cmiguard.serve.protocol import ApiError
from cmiguard.serve.server import ServerConfig, create_app
from cmiguard.train.models import tiny_model

KEY = "test-key"
TAU = 2.5


@pytest.fixture(scope="module")
def server(teacher):
    import uvicorn

    _, tokenizer = teacher
    model = tiny_model(tokenizer.vocab_size if len(tokenizer) <= 49152 else len(tokenizer))
    transform = LowRankTransform(model.config.vocab_size, 4, temperature=TAU)
    config = ServerConfig("tiny", api_key=KEY, max_prompt_tokens=64, max_new_tokens=8, max_batch=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(model, tokenizer, transform, config)
    uv = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    yield {
        "url": f"http://127.0.0.1:{port}/v1",
        "model": model,
        "tokenizer": tokenizer,
        "engine": app.state.engine,
    }
    uv.should_exit = True
    thread.join(timeout=10)


def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0, timeout=60)


def raw_next_logprobs(server, text):
    ids = server["tokenizer"].encode(text, add_special_tokens=False)
    with torch.no_grad():
        return server["model"](torch.tensor([ids])).logits[0, -1].log_softmax(-1)


def test_completions_return_purified_logprobs(server):
    out = client(server).completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=3, logprobs=5, temperature=0
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.top_logprobs[0]) == 5
    raw = raw_next_logprobs(server, "The capital of France is")
    purified = (raw * 1.0 / TAU).log_softmax(-1)  # identity low-rank part, temperature TAU
    top_token = max(lp.top_logprobs[0], key=lp.top_logprobs[0].get)
    assert top_token == server["tokenizer"].decode([int(raw.argmax())])
    assert lp.token_logprobs[0] == pytest.approx(float(purified.max()), abs=1e-4)
    assert lp.token_logprobs[0] != pytest.approx(float(raw.max()), abs=1e-3)


def test_chat_completions_with_top_logprobs(server):
    out = client(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        logprobs=True,
        top_logprobs=20,
        temperature=0,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 8 and len(content[0].top_logprobs) == 20
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-6)
    assert out.usage.completion_tokens == 8
    # bytes: each token's UTF-8, where its text is U+FFFD for part of a character
    entries = content + [t for e in content for t in e.top_logprobs]
    for e in entries:
        assert bytes(e.bytes).decode(errors="replace") == e.token
    # such tokens are among these, and their bytes are not U+FFFD's
    partial = [e for e in entries if "\ufffd" in e.token]
    assert partial and all("\ufffd".encode() not in bytes(e.bytes) for e in partial)
    assert b"".join(bytes(e.bytes) for e in content) == out.choices[0].message.content.encode()


def test_chat_takes_content_parts_and_the_developer_role(server):
    import openai

    # OpenAI's newer clients send content as a list of parts; vLLM joins text parts by "\n"
    c = client(server)
    kw = {"model": "tiny", "max_tokens": 4, "logprobs": True, "top_logprobs": 3, "temperature": 0}
    parts = [{"type": "text", "text": "Name a"}, {"type": "text", "text": "colour."}]
    as_parts = c.chat.completions.create(messages=[{"role": "user", "content": parts}], **kw)
    as_text = c.chat.completions.create(
        messages=[{"role": "user", "content": "Name a\ncolour."}], **kw
    )
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    got = [e.logprob for e in as_parts.choices[0].logprobs.content]
    assert got == pytest.approx([e.logprob for e in as_text.choices[0].logprobs.content], abs=1e-5)
    # OpenAI's newer clients send system instructions as "developer"
    asked = [{"role": "user", "content": "Name a colour."}]
    replies = [
        c.chat.completions.create(messages=[{"role": role, "content": "Be brief."}, *asked], **kw)
        for role in ("developer", "system")
    ]
    assert replies[0].usage.prompt_tokens == replies[1].usage.prompt_tokens
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as refused:
        c.chat.completions.create(messages=[{"role": "user", "content": [parts[0], image]}], **kw)
    error = refused.value.body
    assert "part 1 has type 'image_url'" in error["message"]
    assert error["param"] == "messages.0.content"
    for content in (None, 5):  # was "Input should be a valid string", as if parts were not taken
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)
        assert "content must be a string or a list of text parts" in refused.value.body["message"]


def test_stop_sequences_through_the_api(server):
    def ask(**kw):
        return client(server).completions.create(
            model="tiny", prompt="Tell me", max_tokens=4, temperature=0, **kw
        )

    free = ask().choices[0]
    stop = free.text[len(free.text) // 2 :]
    assert free.finish_reason == "length" and stop
    cut = ask(stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]


def test_top_p_is_honoured_per_request_in_concurrent_batches(server):
    c = client(server)

    def ask(top_p, temperature=1.0):
        return (
            c.completions.create(
                model="tiny",
                prompt="Once upon",
                max_tokens=4,
                temperature=temperature,
                top_p=top_p,
                seed=7,
            )
            .choices[0]
            .text
        )

    greedy = ask(1.0, temperature=0)
    # a nucleus this small holds only the top token, so sampling is greedy; the
    # tiny model's near-flat outputs make a sample with top_p=1 differ from it,
    # so a batch that mixed the two settings would show
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, [1e-9, 1.0] * 4))
    assert texts[0::2] == [greedy] * 4
    assert all(t != greedy for t in texts[1::2])


def test_32_concurrent_clients_all_answer(server):
    c = client(server)

    def ask(i):
        kw = {"model": "tiny", "prompt": f"Number {i} is", "max_tokens": 4, "temperature": 0}
        if i % 2:  # streamed and whole replies share batches
            chunks = list(c.completions.create(stream=True, logprobs=2, **kw))
            return [t for ch in chunks for t in ch.choices[0].logprobs.tokens]
        return c.completions.create(logprobs=2, **kw).choices[0].logprobs.tokens

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len(answers) == 32
    assert all(len(tokens) == 4 for tokens in answers)


def test_n_choices_are_rows_of_one_batch(server):
    c = client(server)
    kw = {"model": "tiny", "prompt": "Once upon", "max_tokens": 6, "logprobs": 1, "n": 3}
    whole = c.completions.create(temperature=1.0, seed=7, **kw)
    texts = [ch.text for ch in whole.choices]
    assert [ch.index for ch in whole.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert whole.usage.prompt_tokens == 2
    assert whole.usage.completion_tokens == sum(len(ch.logprobs.tokens) for ch in whole.choices)
    again = c.completions.create(temperature=1.0, seed=7, **kw)
    assert [ch.text for ch in again.choices] == texts  # one seed, one batch: reproducible
    greedy = c.completions.create(temperature=0, **kw).choices
    assert greedy[0].text == greedy[1].text == greedy[2].text
    events = list(c.completions.create(temperature=1.0, seed=7, stream=True, **kw))
    for ch in whole.choices:
        pieces = [e.choices[0] for e in events if e.choices[0].index == ch.index]
        assert "".join(p.text for p in pieces) == ch.text
        assert [t for p in pieces for t in p.logprobs.tokens] == ch.logprobs.tokens
        assert pieces[-1].finish_reason == ch.finish_reason
    chat = list(
        c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=3,
            n=2,
            seed=7,  # sampled: an unseeded end-of-text token would shorten it now and then
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    firsts = {}
    for e in chat[:-1]:
        firsts.setdefault(e.choices[0].index, e.choices[0].delta.role)
    assert firsts == {0: "assistant", 1: "assistant"}
    assert chat[-1].usage.completion_tokens == 6


def test_best_of_keeps_the_choices_with_the_best_logprob_per_token(server):
    c = client(server)
    kw = {"model": "tiny", "prompt": "Once upon", "max_tokens": 5, "logprobs": 0, "seed": 3}
    sampled = c.completions.create(n=4, **kw)
    kept = c.completions.create(n=2, best_of=4, **kw)

    def per_token(ch):
        return sum(ch.logprobs.token_logprobs) / len(ch.logprobs.token_logprobs)

    ranked = sorted(sampled.choices, key=per_token, reverse=True)
    assert per_token(ranked[1]) > per_token(ranked[2])  # a strict cut
    best = [ch.text for ch in sampled.choices if ch in ranked[:2]]
    assert [ch.text for ch in kept.choices] == best and [ch.index for ch in kept.choices] == [0, 1]
    assert kept.usage.completion_tokens == sampled.usage.completion_tokens == 20


def test_batches_never_hold_more_rows_than_max_batch(server):
    engine, rows = server["engine"], []
    run = engine.generate

    def counted(batch):
        rows.append(sum(j.n for j in batch))
        return run(batch)

    engine.generate = counted
    try:
        c = client(server)
        kw = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: c.completions.create(n=1 + i % 3, **kw), range(12)))
    finally:
        engine.generate = run
    assert [len(a.choices) for a in answers] == [1 + i % 3 for i in range(12)]
    assert sum(rows) == 24 and max(rows) <= 8 and len(rows) >= 3


def test_streamed_completions_add_up_to_the_whole_reply(server):
    c = client(server)
    kw = {"model": "tiny", "prompt": "Tell me", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = c.completions.create(**kw).choices[0]
    events = list(c.completions.create(stream=True, **kw))
    assert events[0].id.startswith("cmpl-") and len({e.id for e in events}) == 1
    chunks = [e.choices[0] for e in events]
    texts = [ch.text for ch in chunks]
    assert "".join(texts) == whole.text and sum(1 for t in texts if t) > 1
    assert chunks[-1].finish_reason == whole.finish_reason == "length"
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [x for ch in chunks for x in getattr(ch.logprobs, key)]
        assert streamed == getattr(whole.logprobs, key), key
    stop = whole.text[len(whole.text) // 2 :]
    cut = list(c.completions.create(stream=True, stop=[stop], **kw))
    assert "".join(ch.choices[0].text for ch in cut) == whole.text[: whole.text.find(stop)]
    assert cut[-1].choices[0].finish_reason == "stop"


def test_streamed_chat_with_logprobs_and_usage(server):
    c = client(server)
    kw = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = c.chat.completions.create(**kw)
    chunks = list(
        c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert chunks[0].object == "chat.completion.chunk" and len({ch.id for ch in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [ch.choices[0] for ch in chunks if ch.choices]
    assert "".join(p.delta.content or "" for p in pieces) == whole.choices[0].message.content
    entries = [(e.token, e.logprob) for p in pieces for e in p.logprobs.content]
    assert entries == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    assert pieces[-1].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_penalties_count_each_rows_generated_tokens():
    prompt_and_replies = torch.tensor([[9, 5, 5, 5, 7], [5, 9, 1, 2, 3]])  # prompt width 2
    penalties = Penalties(torch.tensor([0.5, 0.0]), torch.tensor([1.0, 2.0]), prompt_width=2)
    out = penalties(prompt_and_replies, torch.zeros(2, 10))
    expected = torch.zeros(2, 10)
    expected[0, 5], expected[0, 7] = -(2 * 1.0 + 0.5), -(1.0 + 0.5)  # the prompt's 5 is free
    expected[1, [1, 2, 3]] = -2.0
    assert torch.equal(out, expected)


def test_penalties_change_what_is_sampled_not_the_logprobs(server):
    c, tokenizer, prompt = client(server), server["tokenizer"], "The capital of France is"
    kw = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 1}
    free = c.completions.create(**kw).choices[0].logprobs
    assert len(set(free.tokens)) < len(free.tokens)  # greedy repeats itself
    penalised = c.completions.create(presence_penalty=2.0, **kw).choices[0].logprobs
    assert len(set(penalised.tokens)) == len(penalised.tokens) == 8
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    reply = tokenizer.encode("".join(penalised.tokens), add_special_tokens=False)
    with torch.no_grad():
        logits = server["model"](torch.tensor([ids + reply])).logits[0, len(ids) - 1 : -1]
    served = (logits / TAU).log_softmax(-1).gather(1, torch.tensor(reply)[:, None])[:, 0]
    assert penalised.token_logprobs == pytest.approx(served.tolist(), abs=1e-4)


def test_echo_scores_the_prompt_with_purified_logprobs(server):
    c, tokenizer, prompt = client(server), server["tokenizer"], "The capital of France is"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    kw = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 3}
    plain = c.completions.create(**kw).choices[0]
    echo = c.completions.create(echo=True, **kw).choices[0]
    lp, n = echo.logprobs, len(ids)
    assert echo.text == prompt + plain.text
    assert lp.tokens == [tokenizer.decode([t]) for t in ids] + plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset[:n] == [len(tokenizer.decode(ids[:i])) for i in range(n)]
    assert lp.text_offset[n:] == plain.logprobs.text_offset
    with torch.no_grad():
        logits = server["model"](torch.tensor([ids])).logits[0, :-1]
    purified = (logits / TAU).log_softmax(-1)  # identity low-rank part, temperature TAU
    nxt = torch.tensor(ids[1:])[:, None]
    assert lp.token_logprobs[1:n] == pytest.approx(purified.gather(1, nxt)[:, 0].tolist(), abs=1e-4)
    raw = logits.log_softmax(-1).gather(1, nxt)[:, 0]
    assert (torch.tensor(lp.token_logprobs[1:n]) - raw).abs().min() > 1e-2
    values, tokens = purified.topk(3, dim=-1)
    for row, top in enumerate(lp.top_logprobs[1:n]):
        names = [tokenizer.decode([t]) for t in tokens[row].tolist()]
        assert list(top) == names
        assert list(top.values()) == pytest.approx(values[row].tolist(), abs=1e-4)
    scored = c.completions.create(**(kw | {"max_tokens": 0}), echo=True)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n]
    as_ids = c.completions.create(**(kw | {"prompt": ids}), echo=True).choices[0]
    assert as_ids.text == echo.text and as_ids.logprobs.tokens == lp.tokens
    assert as_ids.logprobs.token_logprobs == lp.token_logprobs
    events = list(c.completions.create(echo=True, stream=True, **kw))
    pieces = [e.choices[0] for e in events]
    assert pieces[0].text == prompt and "".join(p.text for p in pieces) == echo.text
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in pieces for x in getattr(p.logprobs, key)] == getattr(lp, key), key


def test_several_prompts_in_one_request(server):
    """What lm-evaluation-harness's completions backend sends to score text:
    a list of token-id prompts, echo, one logprob, no new tokens."""
    c, tokenizer = client(server), server["tokenizer"]
    texts = ["The capital of France is Paris", "Once upon a time"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    kw = {"model": "tiny", "max_tokens": 0, "echo": True, "logprobs": 1}
    alone = [c.completions.create(prompt=p, **kw).choices[0] for p in ids]
    together = c.completions.create(prompt=ids, **kw)
    assert [ch.index for ch in together.choices] == [0, 1]
    assert [ch.text for ch in together.choices] == texts
    for ch, one in zip(together.choices, alone, strict=True):
        assert ch.logprobs.token_logprobs == pytest.approx(one.logprobs.token_logprobs, abs=1e-5)
        assert ch.logprobs.tokens == one.logprobs.tokens
    assert together.usage.prompt_tokens == sum(map(len, ids))
    kw = {"model": "tiny", "max_tokens": 4, "logprobs": 1, "n": 2, "seed": 5, "prompt": texts}
    whole = c.completions.create(**kw)
    assert [ch.index for ch in whole.choices] == [0, 1, 2, 3]
    assert whole.usage.completion_tokens == 16
    events = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    for ch in whole.choices:
        pieces = [e.choices[0] for e in events if e.choices and e.choices[0].index == ch.index]
        assert "".join(p.text for p in pieces) == ch.text
        assert [t for p in pieces for t in p.logprobs.text_offset] == ch.logprobs.text_offset
    assert events[-1].usage == whole.usage


def test_a_request_is_queued_whole_or_refused(teacher):
    engine = Engine(tiny_model(64), teacher[1], None, ServerConfig("tiny", max_queue=2))
    jobs = [Job([1, 2], 1, 0.0, 0, None, None) for _ in range(3)]
    engine.enqueue(jobs[:1])
    with pytest.raises(ApiError, match="queue is full"):
        engine.enqueue(jobs[1:])
    assert engine.queue.qsize() == 1
    engine.enqueue(jobs[1:2])
    assert engine.queue.qsize() == 2


def test_echo_serves_what_the_evaluation_attacker_distils_from(teacher):
    """The top-k attacker of ``cmiguard evaluate`` is this API's echo, renormalised,
    on one of its own calibration sequences sent as token ids."""
    from fastapi.testclient import TestClient

    from cmiguard.attack.losses import top_k_view
    from cmiguard.train.data import text_examples, wiki_summaries
    from tests.conftest import trained_like

    tokenizer = teacher[1]
    model = tiny_model(len(tokenizer))
    transform = trained_like(LowRankTransform(len(tokenizer), 4, temperature=1.7), scale=0.5)
    ids = text_examples(tokenizer, wiki_summaries("calibration", 1), 64)[0].input_ids
    body = {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 5}
    with TestClient(create_app(model, tokenizer, transform, ServerConfig("tiny"))) as http:
        served = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
        target = defense_fn("cmiguard", {"cmiguard": transform})(logits)
    nxt = torch.tensor(ids[1:])[:, None]
    assert served["token_logprobs"][1:] == pytest.approx(target.gather(1, nxt)[:, 0], abs=1e-4)
    assert (target.argmax(-1) != logits.argmax(-1)).any()  # the learned part moves answers
    values, tokens = top_k_view(target, 5)
    for row, top in enumerate(served["top_logprobs"][1:]):
        assert list(top) == [tokenizer.decode([t]) for t in tokens[row].tolist()]
        got = torch.tensor(list(top.values()))
        assert (got - got.logsumexp(0)).tolist() == pytest.approx(values[row].tolist(), abs=1e-4)
    off = create_app(model, tokenizer, transform, ServerConfig("tiny", echo=False))
    with TestClient(off) as http:
        refused = http.post("/v1/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported"


ASK = {"model": "tiny", "prompt": "x", "max_tokens": 1}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        ({"model": "tiny"}, 400, "invalid_request"),
        (ASK | {"model": "gpt-9"}, 404, "model_not_found"),
        (ASK | {"logprobs": -1}, 400, "invalid_request"),
        (ASK | {"logprobs": 21}, 400, "invalid_request"),
        (ASK | {"max_tokens": 999}, 400, "max_tokens_too_large"),
        (ASK | {"prompt": "word " * 200}, 400, "context_length_exceeded"),
        (ASK | {"n": 0}, 400, "invalid_request"),
        (ASK | {"n": 9}, 400, "invalid_request"),
        (ASK | {"logit_bias": {"13": 100}}, 400, "unsupported"),
        (ASK | {"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request"),
        (ASK | {"stop": ""}, 400, "invalid_request"),
        (ASK | {"top_p": 0}, 400, "invalid_request"),
        (ASK | {"presence_penalty": 2.5}, 400, "invalid_request"),
        (ASK | {"prompt": ""}, 400, "invalid_request"),
        (ASK | {"prompt": [1, 49152]}, 400, "invalid_request"),
        (ASK | {"prompt": [1, "mixed"]}, 400, "invalid_request"),
        (ASK | {"prompt": [True, 5]}, 400, "invalid_request"),  # not token 1
        (ASK | {"prompt": [5.0]}, 400, "invalid_request"),
        (ASK | {"prompt": ["one"] * 9}, 400, "invalid_request"),
        (ASK | {"prompt": ["one", ""]}, 400, "invalid_request"),
        (ASK | {"best_of": 2, "n": 3}, 400, "invalid_request"),
        (ASK | {"best_of": 2, "stream": True}, 400, "invalid_request"),
    ],
)
def test_bad_requests_get_4xx(server, body, status, code):
    r = httpx.post(
        f"{server['url']}/completions",
        content=body if isinstance(body, bytes) else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_a_prompt_of_no_known_form_is_told_the_forms(server):
    r = httpx.post(
        f"{server['url']}/completions",
        json=ASK | {"prompt": ["text", [3, 4]]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "prompt"
    assert error["message"] == (
        "invalid request: prompt must be a string, a list of token ids (integers), "
        "or a list of strings or of token-id lists"
    )


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [
        (b'{"model": "tiny",', "application/json", "the body is not valid JSON: "),
        (b"[1, 2]", "application/json; charset=utf-8", "the body must be a JSON object"),
        (
            json.dumps(ASK).encode(),
            "application/x-www-form-urlencoded",  # what curl -d sends
            "send the body as JSON with Content-Type: application/json "
            "(got application/x-www-form-urlencoded)",
        ),
    ],
    ids=["broken", "array", "form-encoded"],
)
def test_a_body_that_is_not_a_json_object_is_told_so(server, content, content_type, message):
    r = httpx.post(
        f"{server['url']}/completions",
        content=content,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type},
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith("invalid request: " + message), error
    assert error["param"] is None


def test_chat_rejects_negative_top_logprobs_and_auth_is_required(server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "x"}],
        "logprobs": True,
        "top_logprobs": -2,
    }
    r = httpx.post(
        f"{server['url']}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400
    r = httpx.post(f"{server['url']}/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401
    r = httpx.post(
        f"{server['url']}/completions",
        content=b"x" * (2 << 20),
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 413


def test_replies_stop_at_the_end_of_turn_token_and_stop_sequences(teacher):
    model, tokenizer = copy.deepcopy(teacher[0]), teacher[1]
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    config = ServerConfig("smollm2", max_new_tokens=8)

    def reply(eos, max_tokens=6, stop=()):
        model.generation_config.eos_token_id = eos
        engine = Engine(model, tokenizer, None, config)
        return engine.generate([Job(prompt, max_tokens, 0.0, 2, None, None, stop)])[0][0]

    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    ids = out[0, len(prompt) :].tolist()
    first = ids.index(ids[3])
    assert first > 0, ids  # the greedy reply does not open with its fourth token
    free = reply([])  # no end-of-turn token: every step is generated
    assert free["finish_reason"] == "length" and free["completion_tokens"] == 6
    assert free["text"] == tokenizer.decode(ids)
    stopped = reply(ids[3])  # the fourth token (or an earlier copy) ends the turn
    assert stopped["finish_reason"] == "stop" and stopped["text"] == tokenizer.decode(ids[:first])
    assert stopped["completion_tokens"] == first == len(stopped["entries"])
    assert stopped["entries"] == free["entries"][:first]
    assert reply(ids[3], max_tokens=first)["finish_reason"] == "length"
    # " Paris.\n\nThe answer": a stop sequence cuts the text where it starts
    # and the tokens before the one it starts in
    period = reply([], stop=("xyz", "."))
    assert period["text"] == tokenizer.decode(ids[:1]) and period["finish_reason"] == "stop"
    assert period["entries"] == free["entries"][:1]
    inside = reply([], stop=("aris",))
    assert inside["text"] == " P" and inside["entries"] == [] and inside["completion_tokens"] == 0
    assert reply([], stop=("Berlin",)) == free


def test_a_failing_batch_answers_with_an_error_streamed_or_not(teacher):
    from fastapi.testclient import TestClient

    tokenizer = teacher[1]
    model = tiny_model(len(tokenizer))
    wider = LowRankTransform(len(tokenizer) + 8, 2)  # purifying the model's logits fails
    app = create_app(model, tokenizer, wider, ServerConfig("tiny", max_new_tokens=4))
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    with TestClient(app, raise_server_exceptions=False) as http:
        whole = http.post("/v1/completions", json=body)
        with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as streamed:
            events = [line for line in streamed.iter_lines() if line]
    assert whole.status_code == 500 and whole.json()["error"]["code"] == "internal_error"
    assert streamed.status_code == 200 and len(events) == 1
    assert json.loads(events[0].removeprefix("data: "))["error"]["code"] == "internal_error"


def test_a_server_config_that_could_not_serve_is_refused():
    """A limit of 0 would refuse every request (or wait forever): named at start-up."""
    for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_new_tokens", "max_body_bytes"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            ServerConfig("tiny", **{name: 0})
    for name in ("timeout_s", "body_timeout_s"):
        with pytest.raises(ValueError, match=f"{name} must be a positive number of seconds"):
            ServerConfig("tiny", **{name: float("inf")})
