"""``dharma serve`` under concurrent clients: continuous batching's aggregate tokens/s, time to first
token (TTFT) p50/p99 and tokens/s per client at 1, 4, 8 and 16 clients; and one client against what
``dharma generate`` runs (``model.generate``, greedy) on the same model and prompt.

Targets: aggregate tokens/s with 8 clients >= 3x one client's; one client >= 0.9x ``dharma generate``.
Server and ``generate`` both run torch on one thread (``--threads 1``). Ratios come from one run;
``uptime``'s load is printed with them (at load > 1 they are not trusted).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

CLIENTS = (1, 4, 8, 16)
REQUESTS = 3  # per client, one after another
MAX_TOKENS = 64
PROMPTS = ["dharma is", "karma is action and", "seva", "moksha is freedom, and dharma"]
ROUNDS = 5  # one client against model.generate, interleaved
ROUNDS_CLIENTS = 3  # every client count once a round; the table gives medians over rounds


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "dharma_kernel", "serve", f"bench={model}", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(f"{url}/health", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def stream(http: httpx.Client, url: str, prompt: str) -> tuple[float, int, float]:
    """(seconds to the first token, tokens, seconds in all) for one streamed greedy completion.
    ``http``: the client's own connection pool, made before the clock starts and kept between its
    requests, as OpenAI's clients keep theirs (a fresh ``httpx.Client`` costs 15 to 40 ms here,
    mostly its TLS context, which timed the client library rather than the server)."""
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens = None, 0
    with http.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or 0.0, tokens, time.perf_counter() - start


def clients(url: str, count: int) -> dict[str, float]:
    results: list[tuple[float, int, float]] = []
    lock = threading.Lock()

    def client(index: int, http: httpx.Client) -> None:
        for request in range(REQUESTS):
            result = stream(http, url, PROMPTS[(index + request) % len(PROMPTS)])
            with lock:
                results.append(result)

    pools = [httpx.Client() for _ in range(count)]
    threads = [threading.Thread(target=client, args=(i, pools[i])) for i in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    for http in pools:
        http.close()
    ttft = sorted(r[0] for r in results)
    return {
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
        "per_client": statistics.mean(r[1] / r[2] for r in results),
        "aggregate": sum(r[1] for r in results) / wall,
    }


def decode_loop(model_dir: Path, prompt: str, rounds: int = 3) -> tuple[float, float]:
    """Tokens/s of the scheduler alone, in this process (no HTTP, no clients), with 1 and 8 sequences
    at once, interleaved; medians over ``rounds``."""
    import asyncio

    from dharma_kernel.serve.models import load_served
    from dharma_kernel.serve.scheduler import Sampling, Sequence

    served = load_served([f"loop={model_dir}"], 16, 64)["loop"]
    ids, scheduler = list(served.tokenizer(prompt)["input_ids"]), served.scheduler

    async def run(count: int) -> float:
        events = [asyncio.Queue() for _ in range(count)]
        start = time.perf_counter()
        for box in events:
            scheduler.submit(Sequence(ids, MAX_TOKENS, frozenset(), Sampling(0.0), box.put_nowait))
        for box in events:
            while (await box.get())[0] != "done":
                pass
        return count * MAX_TOKENS / (time.perf_counter() - start)

    async def rounds_of_both() -> tuple[float, float]:
        scheduler.start()
        try:
            await run(1)  # warm up
            ones, eights = [], []
            for _ in range(rounds):
                ones.append(await run(1))
                eights.append(await run(8))
        finally:
            await scheduler.stop()
        return statistics.median(ones), statistics.median(eights)

    return asyncio.run(rounds_of_both())


def main() -> bool:
    import torch

    from dharma_kernel.application import load_application
    from dharma_kernel.padding import pad_id
    from dharma_kernel.testing import tiny_serving_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        model_dir = tiny_serving_model(Path(root) / "bench", width=256, layers=4)
        process, url = start_server(model_dir)
        http = httpx.Client()
        try:
            stream(http, url, PROMPTS[0])  # warm up
            print(
                f"model: GPT-2, 4 layers, 256 wide, 3 routed modules after layers 0 and 1; {MAX_TOKENS} "
                f"greedy tokens a request, {REQUESTS} requests a client, medians of {ROUNDS_CLIENTS} "
                f"interleaved rounds; torch on 1 thread; load {load()}"
            )
            header = ("clients", "TTFT p50 s", "TTFT p99 s", "tok/s/client", "aggregate tok/s")
            print(f"{header[0]:>7} {header[1]:>11} {header[2]:>11} {header[3]:>13} {header[4]:>16}")
            runs: dict[int, list[dict[str, float]]] = {count: [] for count in CLIENTS}
            for _ in range(ROUNDS_CLIENTS):  # interleaved: every client count once a round
                for count in CLIENTS:
                    runs[count].append(clients(url, count))
            rows = {
                count: {key: statistics.median(r[key] for r in got) for key in got[0]}
                for count, got in runs.items()
            }
            for count, row in rows.items():
                p50, p99, per_client, aggregate = (
                    row[k] for k in ("ttft_p50", "ttft_p99", "per_client", "aggregate")
                )
                print(f"{count:>7} {p50:>11.3f} {p99:>11.3f} {per_client:>13.1f} {aggregate:>16.1f}")
            batching = rows[8]["aggregate"] / rows[1]["aggregate"]

            model, tokenizer = load_application(model_dir)
            model.eval()
            served, alone = [], []
            for _ in range(ROUNDS):  # interleaved, round by round
                _, tokens, seconds = stream(http, url, PROMPTS[1])
                served.append(tokens / seconds)
                ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
                start = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=MAX_TOKENS,
                        do_sample=False,
                        pad_token_id=pad_id(tokenizer),
                    )
                alone.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
            overhead = statistics.median(served) / statistics.median(alone)
        finally:
            http.close()
            process.terminate()
            process.wait(30)
        loop_one, loop_eight = decode_loop(model_dir, PROMPTS[1])
    print(f"aggregate tok/s, 8 clients / 1 client: {batching:.2f}x (target >= 3x)")
    print(
        f"decode loop alone (no HTTP), 8 sequences / 1: {loop_eight:.0f} / {loop_one:.0f} tok/s = "
        f"{loop_eight / loop_one:.2f}x"
    )
    one, generate = statistics.median(served), statistics.median(alone)
    print(
        f"one client {one:.1f} tok/s / dharma generate {generate:.1f} tok/s: {overhead:.2f}x (target >= 0.9x)"
    )
    print(f"load {load()}" + (": figures under load, ratios not trusted" if os.getloadavg()[0] > 1 else ""))
    return batching >= 3 and overhead >= 0.9


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
