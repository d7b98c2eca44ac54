"""``python -m pipeline serve`` as a user runs it: its own process, queried over HTTP.

One server process for the module (and one with a short read timeout): it answers, its port cannot be taken twice, an oversize body does
not grow its memory, time the server is not reading does not count against its read timeout, and
SIGTERM (last) lets it finish what it received and exit 0.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401  (dask settings before nvtabular)

BODY_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def server(etl_dir, model_dir):
    """``(process, url)`` of a running ``python -m pipeline serve``."""
    from pipeline.serve import serve_in_subprocess

    with serve_in_subprocess("--data", str(etl_dir), "--model", str(model_dir), "--max-body-bytes", str(BODY_LIMIT),
                             "--no-access-log") as running:
        yield running


def test_the_serve_command_answers_on_its_port(server, predictor):
    _, url = server
    response = httpx.post(url + "/predict", json={"pairs": [{"userId": 1, "movieId": 1}]})
    expected = predictor.predict(pd.DataFrame({"userId": [1], "movieId": [1]}))[0]
    assert response.json()["scores"] == [pytest.approx(expected, abs=1e-6)]


@pytest.mark.parametrize("port, message", [(None, "the port is in use"), (70000, "out of range")])
def test_a_port_that_cannot_be_used_fails_at_once_before_the_model_loads(server, etl_dir, model_dir, port, message):
    _, url = server
    port = port or int(url.rsplit(":", 1)[1])
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--data", str(etl_dir), "--model",
                             str(model_dir), "--port", str(port)], capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - start
    assert result.returncode == 2
    last = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(last) == 1 and message in last[0] and str(port) in last[0]
    assert "Traceback" not in result.stderr
    assert "loaded workflow" not in result.stderr and "feature cache" not in result.stderr  # refused before loading
    assert seconds < 30  # ~1.5 s on an idle machine (interpreter + imports); loading the model takes far longer


def peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_an_oversize_body_is_cut_off_without_growing_the_servers_memory(server):
    """300 MB streamed without a Content-Length: the server stops at the 1 MB limit with a 413."""
    process, url = server
    before = peak_rss_mb(process.pid)
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    sent = 0
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"
        try:
            for _ in range(300):
                sock.sendall(chunk)
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed the connection: what we want
        answer = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
    assert sent < 300 << 20, "the server read the whole 300 MB"
    if answer:  # the 413 may be lost to the reset of a connection closed while we were sending
        assert answer.startswith(b"HTTP/1.1 413")
    grown = peak_rss_mb(process.pid) - before
    assert grown < 50, f"peak RSS grew by {grown:.0f} MB"
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}

    response = httpx.post(url + "/predict", content=b" " * (BODY_LIMIT + 1),
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json() == {"error": f"request body larger than {BODY_LIMIT} bytes"}


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """``(status, body)`` of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), body


def large_predict(predictor) -> tuple[pd.DataFrame, bytes]:
    """``(pairs, request)``: one ~0.7 MB raw HTTP/1.1 ``/predict`` request of 20,000 known pairs."""
    import json

    rng = np.random.default_rng(0)
    pairs = pd.DataFrame({"userId": rng.choice(predictor.cache.keys["userId"], 20_000),
                          "movieId": rng.choice(predictor.candidate_items, 20_000)})
    body = json.dumps({"pairs": pairs.to_dict(orient="records")}).encode()
    assert len(body) < BODY_LIMIT
    return pairs, (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body)) + body


def send_in_parallel(sockets: list[socket.socket], request: bytes) -> list[threading.Thread]:
    """``request`` sent on every socket, each from its own thread (started; join them)."""
    senders = [threading.Thread(target=s.sendall, args=(request,)) for s in sockets]
    for t in senders:
        t.start()
    return senders


def assert_all_answered(sockets: list[socket.socket], pairs: pd.DataFrame, predictor) -> None:
    import json

    answers = [read_response(s) for s in sockets]
    for s in sockets:
        s.close()
    expected = predictor.predict(pairs)
    for status, payload in answers:
        assert status == 200
        np.testing.assert_allclose(json.loads(payload)["scores"], expected, atol=1e-5)


def test_time_the_server_is_not_reading_does_not_count_against_the_read_timeout(etl_dir, model_dir, predictor):
    """--read-timeout-s 1: eight connections open, the server is stopped (SIGSTOP, as a loaded machine or a long
    GC pause stops it) while their ~0.7 MB requests are sent, then continued 2 s later. Their deadlines have
    passed, but the bytes wait unread on the server's side: every request is answered instead of reset."""
    from pipeline.serve import serve_in_subprocess

    pairs, request = large_predict(predictor)
    with serve_in_subprocess("--data", str(etl_dir), "--model", str(model_dir), "--max-body-bytes", str(BODY_LIMIT),
                             "--read-timeout-s", "1", "--no-access-log") as (process, url):
        sockets = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60)
                   for _ in range(8)]
        time.sleep(0.3)  # accepted: each connection's deadline is running
        process.send_signal(signal.SIGSTOP)
        try:
            senders = send_in_parallel(sockets, request)
            time.sleep(2.0)
        finally:
            process.send_signal(signal.SIGCONT)
        for t in senders:
            t.join(60)
        assert_all_answered(sockets, pairs, predictor)


def test_sigterm_finishes_what_was_received_and_exits_0(server, predictor):
    """Eight ~0.7 MB requests sent, then SIGTERM at once: every one answered in full, then exit status 0."""
    process, url = server
    pairs, request = large_predict(predictor)
    sockets = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60) for _ in range(8)]
    for t in send_in_parallel(sockets, request):
        t.join(60)
    process.send_signal(signal.SIGTERM)  # parsing and scoring 8 x 20,000 pairs takes far longer than this
    assert_all_answered(sockets, pairs, predictor)
    assert process.wait(timeout=60) == 0
    output = process.stdout.read()
    assert "server stopped" in output and "Traceback" not in output
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/healthz", timeout=2)
