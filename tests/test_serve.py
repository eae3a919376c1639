"""`dharma serve`: the official OpenAI client, continuous batching against `dharma generate`, errors,
fuzzed bodies, a client that goes away, a full queue, SIGTERM, and the chat page in headless Chromium."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from dharma_kernel.testing import one_thread, run_cli, tiny_serving_model

KEY = "test-key"
PROMPTS = ["dharma is", "karma is action and", "seva", "moksha is freedom, and dharma"]
MAX_NEW = 16
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_serving_model(tmp_path_factory.mktemp("serve") / "sage")


@pytest.fixture(scope="module")
def classifier_dir(model_dir) -> Path:
    """A model with a classification head (fresh weights) on the same tokenizer."""
    from dharma_kernel.assemble import build_model
    from dharma_kernel.checkpoint import load_saved_tokenizer, save
    from dharma_kernel.testing import tiny_backbone_config

    tokenizer = load_saved_tokenizer(model_dir)
    head = {"plugin": "classification", "config": {"labels": ["bhakti", "jnana", "karma"]}}
    model = build_model(
        backbone=tiny_backbone_config(vocab_size=len(tokenizer)), layout={"heads": [head]}, seed=3
    )
    return save(model, model_dir.parent / "clf", tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, *options: str, also: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "NO_COLOR": "1", "DHARMA_API_KEY": KEY}
        # one torch thread: a tiny model gains nothing from two, and on a busy machine they wait on each other
        serve = ["serve", f"sage={model_dir}", *also, "--port", str(self.port), "--threads", "1"]
        command = [sys.executable, "-m", "dharma_kernel", *serve]
        # a file, not a pipe nobody reads: a full pipe would stop the server mid-write
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [*command, *options], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("server did not answer /health in 60 s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, body: object, **options) -> httpx.Response:
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=60, **options)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()["models"]["sage"]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture(scope="module")
def server(model_dir, classifier_dir):
    server = Server(model_dir, also=(str(classifier_dir),))
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def generated(model_dir) -> dict[str, str]:
    """What `dharma generate` alone continues each prompt with, greedy."""
    from typer.testing import CliRunner

    from dharma_kernel.cli import app

    answers = {}
    for prompt in PROMPTS:
        argv = ["generate", str(model_dir), prompt, "--max-new-tokens", str(MAX_NEW), "--temperature", "0"]
        with one_thread():  # as the server runs (--threads 1); greedy tokens do not depend on it
            result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(prompt)
        answers[prompt] = result.stdout[len(prompt) :].removesuffix("\n")
    return answers


def test_the_openai_client(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["sage", "clf"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "dharma?"}]
    chat = client.chat.completions.create(model="sage", messages=messages, max_tokens=8, temperature=0)
    reply = chat.choices[0]
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.finish_reason == "length"
    assert chat.usage.completion_tokens == 8 and chat.usage.prompt_tokens > 3
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 8

    stream = client.chat.completions.create(
        model="sage", messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.message.content  # streamed and whole answers agree
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8

    completion = client.completions.create(model="sage", prompt="dharma is", max_tokens=6, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 6

    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="model_not_found|no model 'nobody'"):
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])


def test_stop_sequences_seed_and_explain(server):
    client = server.client()
    whole = client.completions.create(model="sage", prompt="dharma is", max_tokens=12, temperature=0).choices[
        0
    ]
    cut = whole.text[3:5]
    stopped = client.completions.create(
        model="sage", prompt="dharma is", max_tokens=12, temperature=0, stop=[cut]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == whole.text[: whole.text.index(cut)]

    def sample() -> str:
        return (
            client.completions.create(model="sage", prompt="karma", max_tokens=10, temperature=1.0, seed=7)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(3) as pool:  # the same seed gives the same sample, whatever shares the batch
        assert len(set(pool.map(lambda _: sample(), range(3)))) == 1

    stream = client.chat.completions.create(
        model="sage", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True,
        extra_body={"dharma": {"explain": True, "top_modules": 2}},
    )  # fmt: skip
    records = [r for c in stream for r in (c.model_extra or {}).get("dharma", {}).get("tokens", [])]
    assert len(records) == 5
    for record in records:
        assert len(record["top"]) == 2
        assert {t["module"] for t in record["top"]} <= {
            "darshanas.vedanta",
            "darshanas.yoga",
            "darshanas.nyaya",
        }
        assert record["top"][0]["score"] >= record["top"][1]["score"]


def test_sixteen_concurrent_streams_equal_dharma_generate_alone(server, generated):
    before = server.stats()

    def ask(index: int) -> str:
        prompt = PROMPTS[index % len(PROMPTS)]
        extra = {"dharma": {"explain": True}} if index % 2 else None
        stream = server.client().completions.create(
            model="sage", prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True, extra_body=extra
        )
        return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for index, answer in enumerate(answers):
        assert answer == generated[PROMPTS[index % len(PROMPTS)]], index
    after = server.stats()
    tokens = after["generated_tokens"] - before["generated_tokens"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert tokens == 16 * MAX_NEW
    assert steps < tokens / 3  # forward passes were shared


def test_predict_answers_as_dharma_predict(server, classifier_dir):
    from typer.testing import CliRunner

    from dharma_kernel.cli import app

    text = "dharma is duty and karma is action"
    result = CliRunner().invoke(app, ["predict", str(classifier_dir), text, "--json"])
    assert result.exit_code == 0, result.output
    answer = server.post("/v1/predict", {"model": "clf", "text": text})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["head"] == "classification"
    expected = json.loads(result.stdout)
    assert body["prediction"]["label"] == expected["label"]
    assert body["prediction"]["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    assert error_of(server.post("/v1/predict", {"model": "clf"}), 400)["code"] == "missing_required_parameter"
    assert (
        "no task head" in error_of(server.post("/v1/predict", {"model": "sage", "text": "a"}), 400)["message"]
    )


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_errors_in_openai_shape(server, model_dir):
    chat = {"model": "sage", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert error_of(server.post("/v1/chat/completions", b"{not json"), 400)["code"] == "invalid_json"
    assert error_of(server.post("/v1/chat/completions", {"model": "sage"}), 400)["param"] == "messages"
    wrong = server.post("/v1/chat/completions", {**chat, "max_tokens": "four"})
    assert error_of(wrong, 400)["param"] == "max_tokens"
    typed = server.post("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": 3}]})
    assert error_of(typed, 400)["param"] == "messages.0.content"
    order = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    error = error_of(server.post("/v1/chat/completions", {**chat, "messages": order}), 400)
    assert error["code"] == "invalid_role_order" and error["param"] == "messages.1.role"
    long = {"model": "sage", "prompt": "dharma is duty " * 200, "max_tokens": 4}
    assert error_of(server.post("/v1/completions", long), 400)["code"] == "context_length_exceeded"
    assert (
        error_of(server.post("/v1/completions", {**long, "prompt": "a", "max_tokens": 512}), 400)["param"]
        == "max_tokens"
    )
    misspelt = error_of(server.post("/v1/completions", {"model": "sage", "prompt": "a", "max_token": 3}), 400)
    assert "max_token" in misspelt["message"]
    bare = httpx.post(f"{server.url}/v1/completions", json={"model": "sage", "prompt": "a"})
    assert error_of(bare, 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed


def mutate(body: dict, rng: random.Random) -> bytes:
    """A body broken one way: a field dropped, retyped or set out of range, or the bytes cut or garbled."""
    values = [None, -1, 0, 10**9, 1.5, "x", "", [], {}, [1, "a"], True, {"role": "user"}, "\u0000\ud7ff"]
    choice = rng.randrange(7)
    body = json.loads(json.dumps(body))
    fields = [key for key in body if key != "max_tokens"]  # left out, a reply runs to the context's end
    if choice == 0:
        body.pop(rng.choice(fields))
    elif choice == 1:
        body[rng.choice(fields)] = rng.choice(values)
    elif choice == 2:
        message = rng.choice(body["messages"])
        message[rng.choice(["role", "content", "name"])] = rng.choice(values)
    elif choice == 3:
        extra = ["temperature", "top_p", "stop", "seed", "stream", "n", "dharma", "extra"]
        body[rng.choice(extra)] = rng.choice(values)
    elif choice == 6:
        body["max_tokens"] = rng.choice([-1, 0, 10**9, 1.5, "x", "", [], {}])
    raw = json.dumps(body).encode()
    if choice == 4:
        raw = raw[: rng.randrange(len(raw))]
    if choice == 5:
        raw = bytes(rng.randrange(256) if rng.random() < 0.1 else b for b in raw)
    return raw


def test_a_thousand_malformed_bodies_leave_it_healthy(server):
    rng = random.Random(0)
    body = {
        "model": "sage",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
        "temperature": 0,
    }
    statuses = {}
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        for _ in range(1000):
            response = http.post(f"{server.url}/v1/chat/completions", content=mutate(body, rng))
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code in (200, 400), response.text
            if response.status_code == 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert statuses[400] > 500
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    hello = [{"role": "user", "content": "hi"}]
    reply = server.client().chat.completions.create(model="sage", messages=hello, max_tokens=3)
    assert reply.usage.completion_tokens == 3


def wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_full_queue_disconnect_and_sigterm(model_dir):
    """One batch slot and one waiting place: requests beyond them get 429; a client that goes away
    frees its slot at once; SIGTERM lets the request in flight finish and exits 0."""
    server = Server(model_dir, "--max-batch", "1", "--max-queue", "1", "--grace", "20")
    try:
        long = {"model": "sage", "prompt": "dharma", "max_tokens": 200, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:  # all six arrive within one generation's time
            responses = list(pool.map(lambda _: server.post("/v1/completions", long), range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
        assert set(statuses) == {200, 429}
        busy = next(r for r in responses if r.status_code == 429)
        assert error_of(busy, 429)["code"] == "queue_full" and busy.headers["Retry-After"] == "1"

        headers = {"Authorization": f"Bearer {KEY}"}
        before = server.stats()["generated_tokens"]
        with httpx.Client(headers=headers, timeout=60) as http:
            with http.stream(
                "POST", f"{server.url}/v1/completions", json={**long, "max_tokens": 500, "stream": True}
            ) as gone:
                next(gone.iter_lines())
            wait_for(lambda: server.stats()["running"] == 0, 10)
            assert server.stats()["generated_tokens"] - before < 500  # cut short, not run to the end

            with http.stream(
                "POST", f"{server.url}/v1/completions", json={**long, "max_tokens": 100, "stream": True}
            ) as late:
                lines = late.iter_lines()
                next(lines)
                server.process.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(30) == 0
    finally:
        server.stop()


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory) -> Path:
    """The test model with 4,096 positions: room for a reply far longer than any grace below."""
    return tiny_serving_model(tmp_path_factory.mktemp("serve-long") / "sage", positions=4096)


def sse_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line.startswith("data: ")]


def test_sigterm_ends_what_outlasts_the_grace(long_model_dir):
    """SIGTERM with --grace 3: new connections are refused at once; a short stream in flight finishes
    (finish_reason length, [DONE]); a 4,000-token stream and a 4,000-token whole reply, which no CPU
    generates in 3 s (that needs a forward of this model in under 0.75 ms), end when the grace runs
    out: the stream with an error event (server_shutdown) and [DONE], the whole reply with a 503; the
    process exits 0 with no traceback. No assert depends on speed beyond that margin."""
    server = Server(long_model_dir, "--grace", "3")
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "sage", "prompt": "dharma", "temperature": 0, "stream": True}
    results: dict[str, object] = {}

    def long_stream(http: httpx.Client) -> None:
        with http.stream("POST", f"{server.url}/v1/completions", json={**body, "max_tokens": 4000}) as long:
            lines = long.iter_lines()
            results["first"] = next(lines)
            results["long"] = [line for line in lines if line.startswith("data: ")]
            results["long_ended"] = time.monotonic()

    def long_whole(http: httpx.Client) -> None:
        results["whole"] = http.post(
            f"{server.url}/v1/completions", json={**body, "stream": False, "max_tokens": 4000}
        )

    try:
        with httpx.Client(headers=headers, timeout=120) as http, ThreadPoolExecutor(2) as pool:
            streaming = pool.submit(long_stream, http)
            whole = pool.submit(long_whole, http)
            wait_for(lambda: server.stats()["running"] == 2 and "first" in results)
            short = {**body, "max_tokens": 20, "stream_options": {"include_usage": True}}

            def refused() -> bool:
                try:
                    httpx.get(f"{server.url}/health", timeout=5)
                except httpx.ConnectError:
                    return True
                except (httpx.ReadError, httpx.RemoteProtocolError):
                    pass  # taken into the backlog just before the socket closed, then reset
                return False

            with http.stream("POST", f"{server.url}/v1/completions", json=short) as response:
                lines = response.iter_lines()
                next(lines)  # its first token is out: it is in flight
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                wait_for(refused, 10)  # the rest of the short stream waits in the socket meanwhile
                refused_at = time.monotonic()
                short_lines = [line for line in lines if line.startswith("data: ")]
            streaming.result(60)
            whole.result(60)
        code = server.process.wait(30)
        exited = time.monotonic()
    finally:
        server.stop()

    # the short stream ran to its end
    assert short_lines[-1] == "data: [DONE]"
    assert json.loads(short_lines[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 20
    assert json.loads(short_lines[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    # the long stream: text, then the error event, then [DONE]; cut short, not run to the end
    long_lines = results["long"]
    assert long_lines[-1] == "data: [DONE]"
    error = json.loads(long_lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "server_shutdown" and "--grace" in error["message"]
    chunks = [json.loads(line.removeprefix("data: ")) for line in [results["first"], *long_lines[:-2]]]
    assert 1 < len(chunks) < 4000
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks)
    assert error_of(results["whole"], 503)["code"] == "server_shutdown"
    # refused while the long stream was still running; exit 0 within the grace and a wide margin
    assert refused_at < results["long_ended"]
    assert results["long_ended"] - signalled > 2.5  # it ran on until the grace was over
    assert code == 0 and exited - signalled < 3 + 20
    assert "Traceback" not in server.output() and "ERROR" not in server.output()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (.ci/run installs Debian's chromium)")
def test_chat_page_in_headless_chromium(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_selector("#status:has-text('API key')")  # the server wants its key
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_selector("#model option[value=sage]", state="attached")
            page.fill("#max", "12")
            page.fill("#message", "What is dharma?")
            page.click("#go")
            page.wait_for_selector("#go:not([disabled])", timeout=30000)
            assert page.inner_text(".turn.user") == "What is dharma?"
            reply = page.inner_text(".turn.assistant")
            assert reply.strip()
            tinted = page.query_selector_all(".turn.assistant span[data-module]")
            assert tinted, "no generated token is tinted by a module"
            title = tinted[0].get_attribute("title")
            assert title.split()[0] in {"darshanas.vedanta", "darshanas.yoga", "darshanas.nyaya"}
            assert tinted[0].evaluate("span => getComputedStyle(span).backgroundColor") != "rgba(0, 0, 0, 0)"
            assert page.inner_text("#status") == "" and not page.query_selector(".turn.error")

            # Stop: the reply ends where it is and the request leaves the batch
            before = server.stats()["generated_tokens"]
            page.fill("#max", "400")
            page.fill("#message", "And karma?")
            page.click("#go")
            page.wait_for_selector(".turn.assistant >> nth=1 >> span[data-module]", state="attached")
            page.click("#stop")
            page.wait_for_selector("#go:not([disabled])", timeout=5000)
            wait_for(lambda: server.stats()["running"] == 0, 5)
            assert server.stats()["generated_tokens"] - before < 400
            assert len(page.query_selector_all(".turn.user")) == 2
        finally:
            browser.close()


def test_cli_errors_are_one_line(capsys, model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_cli(capsys, "serve", str(model_dir), "--port", str(taken.getsockname()[1]))
    assert code == 2 and err.startswith("error: cannot listen on 127.0.0.1:") and "Traceback" not in err
    code, _, err = run_cli(capsys, "serve", "a=" + str(model_dir), "a=" + str(model_dir))
    assert code == 2 and "two models are named a" in err
    code, _, err = run_cli(capsys, "serve", str(model_dir.parent / "missing"))
    assert code == 2 and "no such model or run directory" in err
