"""spd-serve: the OpenAI-compatible server on the embedded model at TP 3 (emulated), with SPD on half its blocks,
driven by the official `openai` client and by raw HTTP. One server for the module; the SIGTERM test ends it."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "configs/plans/smollm2_tp3_half.json"
pytestmark = pytest.mark.xdist_group("serve")  # one server for the module, on one worker
PROMPT = "The capital of France is"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    p = subprocess.Popen([sys.executable, str(ROOT / "launch/serve.py"), "--tp", "3", "--emulate", "--spd-plan",
                          str(PLAN), "--port", str(port), "--max-queue", "8", "--default-max-tokens", "12"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if p.poll() is not None:
            pytest.fail(f"spd-serve exited: {p.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    yield p, url
    if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def infer_text():
    """What spd-infer prints for PROMPT with the same plan, greedy, 12 new tokens."""
    r = subprocess.run([sys.executable, str(ROOT / "launch/infer.py"), "--tp", "3", "--emulate", "--spd-plan", str(PLAN),
                        "--max-new-tokens", "12", "--prompt", PROMPT, "--json", "--no-warmup"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["results"][0]["text"]


def _client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def _post(url, path, body, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_client_greedy_equals_spd_infer(server, infer_text):
    _, url = server
    c = _client(url)
    assert [m.id for m in c.models.list().data] == ["embedded"]
    r = c.completions.create(model="embedded", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == infer_text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    streamed = c.completions.create(model="embedded", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    parts = [ch.choices[0].text for ch in streamed]
    assert "".join(parts) == infer_text and len([p for p in parts if p]) >= 2  # it arrived in pieces


def test_chat_streaming_and_not_agree(server):
    _, url = server
    c = _client(url)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full = c.chat.completions.create(model="embedded", messages=msgs, max_tokens=10, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and text
    chunks = list(c.chat.completions.create(model="embedded", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    s = c.completions.create(model="embedded", prompt=PROMPT, max_tokens=12, temperature=0, stop=[" are"])
    assert " are" not in s.choices[0].text and s.choices[0].finish_reason == "stop"
    a, b = (c.completions.create(model="embedded", prompt=PROMPT, max_tokens=6, temperature=0.9, top_p=0.9,
                                 seed=7).choices[0].text for _ in range(2))
    assert a == b  # a seed makes sampling repeatable


def test_eight_concurrent_clients_are_all_answered(server, infer_text):
    _, url = server
    c = _client(url)
    out = [None] * 8

    def ask(i):
        out[i] = c.completions.create(model="embedded", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert out == [infer_text] * 8


@pytest.mark.parametrize("body,status,match", [
    (None, 400, "not valid JSON"),
    ({"model": "embedded", "prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "embedded", "prompt": ""}, 400, "prompt is empty"),
    ({"model": "embedded", "prompt": PROMPT, "max_tokens": 9000}, 400, "exceed the model's context"),
    ({"model": "embedded", "prompt": PROMPT, "temperature": -0.5}, 400, "temperature"),
    ({"model": "embedded", "prompt": PROMPT, "temperature": float("nan")}, 400, "temperature"),
    ({"model": "gpt-4", "prompt": PROMPT}, 404, "does not exist"),
    ({"model": "embedded", "prompt": PROMPT, "n": 3}, 400, "n = 1"),
])
def test_bad_input_is_a_4xx_with_an_openai_error_body(server, body, status, match):
    _, url = server
    got, err = _post(url, "/v1/completions", body, raw=b"{not json" if body is None else None)
    assert got == status and match in err["error"]["message"], err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    got, err = _post(url, "/v1/chat/completions", {"model": "embedded", "messages": []})
    assert got == 400 and "messages" in err["error"]["message"]


def test_a_full_queue_is_503_and_the_rest_are_answered(server, infer_text):
    _, url = server
    results = [None] * 16

    def ask(i):
        results[i] = _post(url, "/v1/completions", {"model": "embedded", "prompt": PROMPT, "max_tokens": 12,
                                                    "temperature": 0})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503} and 503 in codes and codes.count(200) >= 8, codes
    assert all(b["choices"][0]["text"] == infer_text for c, b in results if c == 200)
    busy = next(b for c, b in results if c == 503)
    assert busy["error"]["code"] == "queue_full"


def _metric(url, name):
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


def test_a_client_that_disconnects_frees_its_slot(server):
    _, url = server
    before = _metric(url, "spd_requests_cancelled_total")
    body = json.dumps({"model": "embedded", "prompt": PROMPT, "max_tokens": 4000, "temperature": 0,
                       "stream": True}).encode()
    r = urllib.request.urlopen(urllib.request.Request(f"{url}/v1/completions", body,
                                                      {"Content-Type": "application/json"}), timeout=300)
    first = r.readline()
    assert first.startswith(b"data: ")
    r.close()  # gone mid-stream
    deadline = time.time() + 120
    while _metric(url, "spd_requests_cancelled_total") == before and time.time() < deadline:
        time.sleep(0.2)
    assert _metric(url, "spd_requests_cancelled_total") == before + 1
    t0 = time.time()  # the next request runs at once, not after 4000 tokens
    assert _post(url, "/v1/completions", {"model": "embedded", "prompt": "Hi", "max_tokens": 2})[0] == 200
    assert time.time() - t0 < 120
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    for name in ("spd_queue_length", "spd_time_to_first_token_seconds_bucket", "spd_time_per_output_token_seconds_sum",
                 "spd_generation_tokens_total", "spd_requests_finished_total"):
        assert name in text


def test_load_script_counts_every_request_once(server):
    _, url = server
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{os.getpid()}.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_serve.py"), "--url", url, "--requests", "6",
                        "--concurrency", "3", "--max-tokens", "3", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    out.unlink()
    assert res["answered"] == 6 and res["lost"] == 0 and res["duplicate_ids"] == 0
    assert res["tokens"] == 18 and res["server_overhead_per_token_ms"] is not None


def test_sigterm_finishes_the_request_in_flight_then_exits_0(server):
    """Last in the module: it stops the shared server."""
    p, url = server
    body = json.dumps({"model": "embedded", "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                       "stream": True}).encode()
    r = urllib.request.urlopen(urllib.request.Request(f"{url}/v1/completions", body,
                                                      {"Content-Type": "application/json"}), timeout=300)
    lines = [r.readline()]
    p.send_signal(signal.SIGTERM)
    lines += r.read().splitlines()
    events = [ln for ln in lines if ln.strip()]
    assert events[-1].strip() == b"data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert p.wait(timeout=120) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=5)


def test_one_process_per_device_and_a_dead_process(infer_text):
    """--spawn 3: process 0 serves HTTP, processes 1-2 decode in lockstep (real TP 3 over three processes gives
    the emulated run's greedy text); when process 1 dies the server answers 503 and every process exits."""
    port = _free_port()
    p = subprocess.Popen([sys.executable, str(ROOT / "launch/serve.py"), "--tp", "3", "--spawn", "3", "--spd-plan",
                          str(PLAN), "--port", str(port), "--default-max-tokens", "12"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert p.poll() is None, p.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        c = _client(url)
        assert c.completions.create(model="embedded", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text \
            == infer_text
        streamed = c.completions.create(model="embedded", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in streamed) == infer_text
        time.sleep(1.5)  # idle: the other processes wait in the idle broadcasts
        assert c.completions.create(model="embedded", prompt="Hi", max_tokens=2, temperature=0).choices[0].text
        follower = subprocess.run(["pgrep", "-f", "--", f"--port {port} .*--process-id 1"], capture_output=True,
                                  text=True).stdout.split()
        assert len(follower) == 1
        os.kill(int(follower[0]), signal.SIGKILL)
        time.sleep(1.0)
        code, err = _post(url, "/v1/completions", {"model": "embedded", "prompt": PROMPT, "max_tokens": 4})
        assert code == 503 and err["error"]["code"] == "engine_failed", err
        assert p.wait(timeout=120) != 0
        out = p.stdout.read()
        assert "error: process 1 of 3 failed" in out and "killed by signal 9" in out
    finally:
        if p.poll() is None:
            p.kill()
        subprocess.run(["pkill", "-9", "-f", "--", f"--port {port} "], capture_output=True)
