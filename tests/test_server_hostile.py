"""``cmiguard serve`` under hostile clients: every bad request a 4xx in the
OpenAI shape, no request failing another, bodies bounded, abandoned work
stopped, and a fuzzer that finds no 5xx."""

import asyncio
import copy
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmiguard import LowRankTransform
from cmiguard.serve.engine import Engine
from cmiguard.serve.server import ServerConfig, create_app
from cmiguard.train.models import tiny_model

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ASK = {"model": "tiny", "prompt": "Hello there", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def make_app(tokenizer, **overrides):
    model = tiny_model(len(tokenizer))
    transform = LowRankTransform(model.config.vocab_size, 4)
    with_defaults = {
        "api_key": KEY,
        "max_prompt_tokens": 64,
        "max_new_tokens": 64,
        "max_batch": 8,
        "body_timeout_s": 2.0,
    }
    return create_app(
        model, tokenizer, transform, ServerConfig("tiny", **with_defaults | overrides)
    )


@pytest.fixture(scope="module")
def http(teacher):
    with TestClient(make_app(teacher[1]), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def live(teacher):
    """A real uvicorn server (bodies, disconnects and streams go over a socket)."""
    import uvicorn

    app = make_app(teacher[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "engine": app.state.engine}
    server.should_exit = True
    thread.join(timeout=10)


def post(http, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = AUTH | {"Content-Type": "application/json"} | kw.pop("headers", {})
    return http.post(path, content=content, headers=headers, **kw)


def assert_openai_error(r, status, param=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error


LONE = "\ud800"  # a lone UTF-16 surrogate: JSON carries it, UTF-8 cannot


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", ASK | {"seed": 2**64}, "seed"),
        ("/v1/completions", ASK | {"seed": -(10**30)}, "seed"),
        ("/v1/completions", ASK | {"prompt": "a" + LONE}, "prompt"),
        ("/v1/completions", ASK | {"stop": ["ok", "b" + LONE]}, "stop.1"),
        ("/v1/completions", ASK | {"stop": ["ok", ""]}, "stop.1"),  # not "should be a string"
        ("/v1/completions", ASK | {"stop": "x" * 257}, "stop"),
        ("/v1/completions", ASK | {"top_k": 5}, "top_k"),
        ("/v1/completions", ASK | {"min_p": 0.1}, "min_p"),
        ("/v1/completions", ASK | {"suffix": "end"}, "suffix"),
        ("/v1/completions", ASK | {"prompt_logprobs": 3}, "prompt_logprobs"),
        ("/v1/completions", ASK | {"logit_bias": {"5": 100}}, "logit_bias"),
        ("/v1/completions", ASK | {"repetition_penalty": 1.2}, "repetition_penalty"),
        ("/v1/completions", ASK | {"frobnicate": 1}, "frobnicate"),
        ("/v1/completions", ASK | {"max_tokens": 2**40}, "max_tokens"),
        ("/v1/completions", ASK | {"prompt": "x" * 5000}, "prompt"),
        ("/v1/chat/completions", CHAT | {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", CHAT | {"tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", CHAT | {"response_format": {"type": "json"}}, "response_format"),
        (
            "/v1/chat/completions",
            CHAT | {"messages": [{"role": "user", "content": LONE}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            CHAT | {"messages": [{"role": "bot", "content": "x"}]},
            "messages.0.role",
        ),
        ("/v1/chat/completions", CHAT | {"model": "gpt-9"}, "model"),
    ],
)
def test_bad_fields_are_refused_by_name(http, path, body, param):
    status = 404 if body.get("model") == "gpt-9" else 400
    assert_openai_error(post(http, path, body), status, param)


def test_non_finite_numbers_are_refused(http):
    """Python's json (what Starlette parses with) accepts NaN and Infinity."""
    for raw in (b'"temperature": NaN', b'"top_p": Infinity', b'"presence_penalty": -Infinity'):
        body = b'{"model": "tiny", "prompt": "x", "max_tokens": 1, ' + raw + b"}"
        assert_openai_error(post(http, "/v1/completions", body), 400)


def test_a_tiny_temperature_is_greedy(http):
    greedy = post(http, "/v1/completions", ASK | {"temperature": 0, "max_tokens": 4}).json()
    tiny = post(http, "/v1/completions", ASK | {"temperature": 1e-38, "max_tokens": 4})
    assert tiny.status_code == 200
    assert tiny.json()["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_routes_and_errors_speak_openai(http):
    assert_openai_error(r := post(http, "/v1/responses", {"input": "hi"}), 404)
    assert "no route /v1/responses: this server serves POST /v1/completions" in r.text
    assert_openai_error(r := http.get("/v1/completions", headers=AUTH), 405)
    assert "GET is not allowed on /v1/completions" in r.text
    assert_openai_error(post(http, "/v1/completions", b"{not json"), 400)
    assert_openai_error(post(http, "/v1/completions", b"[1, 2]"), 400)
    assert http.get("/health").json()["status"] == "ok"  # no key needed
    assert_openai_error(http.get("/metrics"), 401)
    assert http.get("/v1/models/tiny", headers=AUTH).json()["id"] == "tiny"
    assert_openai_error(http.get("/v1/models/other", headers=AUTH), 404, "model")
    assert_openai_error(
        http.post("/v1/completions", json=ASK, headers={"Authorization": "Bearer wrong"}), 401
    )
    post(http, "/v1/completions", ASK)
    text = http.get("/metrics", headers=AUTH).text
    assert 'cmiguard_requests_total{route="/v1/completions",status="200"}' in text
    assert "cmiguard_queue_depth" in text and 'cmiguard_tokens_total{kind="prompt"}' in text


def test_one_token_echo_in_a_batch_fails_nobody(teacher):
    """The echoed one-token prompt has no predicted token: its reply is that
    token with no log-prob; seven innocent requests batched with it answer."""
    app = make_app(teacher[1])
    with TestClient(app) as http:
        lone = ASK | {"prompt": "Hello", "echo": True, "max_tokens": 0, "logprobs": 2}
        innocent = ASK | {"max_tokens": 3, "logprobs": 1}
        with ThreadPoolExecutor(8) as pool:
            for _ in range(3):
                futures = [pool.submit(post, http, "/v1/completions", lone)]
                futures += [pool.submit(post, http, "/v1/completions", innocent) for _ in range(7)]
                replies = [f.result() for f in futures]
                assert [r.status_code for r in replies] == [200] * 8, replies[0].text
                echoed = replies[0].json()["choices"][0]
                assert echoed["text"] == "Hello"
                assert echoed["logprobs"]["token_logprobs"] == [None]


def test_chat_templates_that_refuse_or_are_missing_give_a_400(teacher):
    """A base model has no chat template, and a template may refuse messages
    (a system role, roles that do not alternate): the client is told, in a 400."""
    tokenizer = copy.deepcopy(teacher[1])
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    system = {"role": "system", "content": "Be brief."}
    with TestClient(make_app(tokenizer), raise_server_exceptions=False) as http:
        assert post(http, "/v1/chat/completions", CHAT).status_code == 200
        refused = post(
            http, "/v1/chat/completions", CHAT | {"messages": [system, *CHAT["messages"]]}
        )
        assert refused.status_code == 400, refused.text
        assert "System role not supported" in refused.json()["error"]["message"]
        tokenizer.chat_template = None
        missing = post(http, "/v1/chat/completions", CHAT)
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "no_chat_template"
        assert post(http, "/v1/completions", ASK).status_code == 200


def test_token_ids_must_be_known_to_the_tokenizer_and_the_model(teacher):
    """A model's embedding may have fewer rows than its tokenizer has ids."""
    app = create_app(tiny_model(1000), teacher[1], None, ServerConfig("tiny", api_key=KEY))
    with TestClient(app, raise_server_exceptions=False) as http:
        assert post(http, "/v1/completions", ASK | {"prompt": [3, 999]}).is_success
        past = post(http, "/v1/completions", ASK | {"prompt": [3, 1000]})
        assert_openai_error(past, 400, "prompt")
        assert "[0, 1000)" in past.json()["error"]["message"]


def test_requests_stay_within_the_models_positions(teacher):
    """GPT-2's learned positions end at 256: a request past them is a 400, and
    requests that each fit are not batched where a row would run past them."""
    from cmiguard.serve.engine import Job

    tokenizer = teacher[1]
    model = tiny_model(len(tokenizer), arch="gpt2")
    app = create_app(model, tokenizer, None, ServerConfig("tiny", api_key=KEY))
    engine = app.state.engine
    assert engine.context == 256
    with TestClient(app, raise_server_exceptions=False) as http:
        over = post(http, "/v1/completions", ASK | {"prompt": [7] * 250, "max_tokens": 7})
        assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
        assert post(
            http, "/v1/completions", ASK | {"prompt": [7] * 250, "max_tokens": 6}
        ).is_success

    batches = []
    generate = engine.generate
    engine.generate = lambda batch: batches.append(batch) or generate(batch)

    async def queued_then_run() -> list:
        loop = asyncio.get_running_loop()
        # a long prompt with a short reply, then short prompts with long replies:
        # each fits alone; together a row would reach position 250 + 20
        jobs = [Job([7] * 250, 2, 0.0, 0, None, loop.create_future())]
        jobs += [Job([7] * 5, 20, 0.0, 0, None, loop.create_future()) for _ in range(3)]
        engine.enqueue(jobs)
        worker = asyncio.create_task(engine.run())
        try:
            return await asyncio.gather(*(j.future for j in jobs))
        finally:
            worker.cancel()

    results = asyncio.run(queued_then_run())
    assert [r[0]["completion_tokens"] for r in results] == [2, 20, 20, 20]
    assert [[len(j.prompt_ids) for j in b] for b in batches] == [[250], [5, 5, 5]]


def test_a_job_that_fails_at_run_time_fails_alone(teacher, monkeypatch):
    """A batch that raises is run again a request at a time: only the request
    that raises gets the error (a 500: the server's fault, not the client's)."""
    app = make_app(teacher[1])
    engine: Engine = app.state.engine
    original = engine._prompt_entries

    def poisoned(job, device):
        if job.echo == "poison":
            raise RuntimeError("boom")
        return original(job, device)

    monkeypatch.setattr(engine, "_prompt_entries", poisoned)
    with TestClient(app, raise_server_exceptions=False) as http, ThreadPoolExecutor(6) as pool:
        bad = pool.submit(post, http, "/v1/completions", ASK | {"prompt": "poison", "echo": True})
        good = [pool.submit(post, http, "/v1/completions", ASK) for _ in range(5)]
        assert [g.result().status_code for g in good] == [200] * 5
        assert bad.result().status_code == 500
        assert bad.result().json()["error"]["code"] == "internal_error"


def raw_request(port, head, body=b""):
    """Send bytes on a socket; the status line of the answer (or '' if none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        s.sendall(body)
        try:
            return s.recv(200).split(b"\r\n", 1)[0].decode()
        except TimeoutError:
            return ""


def test_bodies_are_bounded_chunked_or_not_and_must_arrive(live):
    port = live["port"]
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth
    chunked += b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"x" * 65536
    body = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * 20 + b"0\r\n\r\n"  # 1.3 MB
    start = time.perf_counter()
    assert raw_request(port, chunked, body).endswith("413 Request Entity Too Large")
    assert time.perf_counter() - start < 5
    declared = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 99\r\n\r\n"
    )
    start = time.perf_counter()  # a body that stops half-way: answered at the body timeout
    assert raw_request(port, declared, b'{"model": "ti').endswith("408 Request Timeout")
    assert 1.5 < time.perf_counter() - start < 6
    huge = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 99999999\r\n\r\n"
    )
    assert raw_request(port, huge).endswith("413 Request Entity Too Large")
    assert httpx.get(f"{live['url']}/health").status_code == 200


def test_an_abandoned_stream_frees_its_row(live):
    """A client that reads one piece and leaves: its batch stops within a step,
    and the next request does not wait for the 60 tokens it asked for."""
    engine = live["engine"]
    before = engine.metrics.tokens.labels("completion")._value.get()
    body = ASK | {"max_tokens": 60, "stream": True, "temperature": 1.0, "seed": 3}
    with httpx.stream(
        "POST", f"{live['url']}/v1/completions", json=body, headers=AUTH, timeout=30
    ) as r:
        first = next(line for line in r.iter_lines() if line)
    assert first.startswith("data: ")
    deadline = time.perf_counter() + 10
    while engine.queue.qsize() or not _idle(engine):
        assert time.perf_counter() < deadline
        time.sleep(0.05)
    generated = engine.metrics.tokens.labels("completion")._value.get() - before
    assert generated < 30, generated  # stopped well before 60
    quick = httpx.post(f"{live['url']}/v1/completions", json=ASK | {"max_tokens": 1}, headers=AUTH)
    assert quick.status_code == 200


def _idle(engine) -> bool:
    """No batch is running (the worker waits on its queue)."""
    return engine.batch_running is False


@st.composite
def bad_bodies(draw):
    """A valid request with one field replaced by something hostile."""
    base = dict(draw(st.sampled_from([ASK, CHAT])))
    field = draw(
        st.sampled_from(
            [
                "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed",
                "stop", "n", "logprobs", "echo", "best_of", "stream", "presence_penalty",
                "frequency_penalty", "top_logprobs", "stream_options", "user", "extra",
            ]
        )
    )  # fmt: skip
    weird = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=50),
        st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
        st.lists(st.integers(min_value=-5, max_value=60000), max_size=8),
        st.lists(st.text(max_size=5), max_size=6),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
        st.just("x" * 3000),
        st.just([[1, 2], "mixed"]),
        st.just([{"role": "user", "content": 5}]),
    )
    base[field] = draw(weird)
    return base


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bad_bodies(), chat=st.booleans())
def test_fuzzed_requests_never_get_a_5xx(http, body, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return
    r = post(http, path, content)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert http.get("/health").status_code == 200


def test_64_concurrent_clients_in_an_event_loop(live):
    async def one(client, i):
        r = await client.post(
            f"{live['url']}/v1/completions", json=ASK | {"seed": i, "temperature": 1}, headers=AUTH
        )
        return r.status_code

    async def all_of_them():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    assert asyncio.run(all_of_them()) == [200] * 64
