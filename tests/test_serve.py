"""``tlx serve`` over real HTTP: a server started as a user starts it, on a free port of 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import anyio
import pytest
from PIL import Image

import tlx

from .conftest import HYMENOPTERA, REPO, TLX, run_tlx
from .test_api import LITE0, small_hymenoptera

BEE = HYMENOPTERA / "val" / "bees" / "1032546534_06907fe3b3.jpg"
ANT = HYMENOPTERA / "val" / "ants" / "10308379_1b6c72e180.jpg"


class Server(NamedTuple):
    url: str
    process: subprocess.Popen


def start(run_dir: Path, *args: str) -> tuple[Server, str]:
    """``tlx serve RUN_DIR --port 0 ARGS`` in a subprocess; the server and its first line, once ready."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [*TLX, "serve", str(run_dir), "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    line = process.stdout.readline()  # the URL, printed once the server listens
    found = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if not found:
        process.kill()
        pytest.fail(f"tlx serve did not start: {line!r} {process.communicate(timeout=30)}")
    return Server(found.group(), process), line


def stop(server: Server) -> None:
    server.process.terminate()
    server.process.communicate(timeout=30)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick EfficientNet-Lite0 run on a few ants and bees (offline: its weights ship with its plugin)."""
    tmp = tmp_path_factory.mktemp("serve")
    data = small_hymenoptera(tmp / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        run = tlx.fit(LITE0, [f"dataset.root={data}", "train.epochs=2"], out=tmp / "run", cache_dir=tmp / "c")
    return run.folder


@pytest.fixture(scope="module")
def server(run_dir: Path) -> Iterator[Server]:
    """One server for the module, with a 1 MB upload limit."""
    server, _ = start(run_dir, "--max-upload-mb", "1")
    yield server
    stop(server)


def multipart(files: Iterable[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    """A multipart form body with one ``field`` per file, and its content type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def call(url: str, body: bytes | None = None, content_type: str | None = None) -> tuple[int, Any]:
    """``(status, JSON)`` of a GET (no body) or POST."""
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post_files(server: Server, *paths: Path) -> tuple[int, Any]:
    return call(server.url + "predict", *multipart((p.name, p.read_bytes()) for p in paths))


def test_predictions_are_those_of_tlx_predict(server: Server, run_dir: Path) -> None:
    cli = run_tlx("predict", run_dir, BEE, ANT, "--json", "--top-k", "2")
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)

    status, answer = post_files(server, BEE, ANT)
    assert status == 200, answer
    got = answer["predictions"]
    assert [p["file"] for p in got] == [BEE.name, ANT.name]
    for mine, theirs in zip(got, expected):
        assert mine["label"] == theirs["label"]
        assert mine["probability"] == pytest.approx(theirs["probability"], abs=1e-6)
        assert [t["label"] for t in mine["top_k"]] == [t["label"] for t in theirs["top_k"]]
        for a, b in zip(mine["top_k"], theirs["top_k"]):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)

    status, raw = call(server.url + "predict", BEE.read_bytes(), "image/jpeg")  # a raw image body
    assert status == 200
    assert raw["predictions"][0]["probability"] == pytest.approx(expected[0]["probability"], abs=1e-6)
    status, one = call(server.url + "predict?top_k=1", BEE.read_bytes(), "image/jpeg")
    assert [t["label"] for t in one["predictions"][0]["top_k"]] == [expected[0]["label"]]


def test_health_names_the_run_and_its_classes_on_loopback(server: Server, run_dir: Path) -> None:
    status, health = call(server.url + "health")
    assert status == 200
    assert (health["run"], health["classes"]) == (run_dir.name, ["ants", "bees"])
    assert (health["host"], health["loopback"]) == ("127.0.0.1", True)


def test_the_page_loads_nothing_from_elsewhere(server: Server) -> None:
    with urllib.request.urlopen(server.url, timeout=30) as response:
        page = response.read().decode()
    assert 'type="file"' in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def bomb() -> bytes:
    """A PNG of a few kilobytes that decodes to 100 megapixels (over Pillow's bomb warning limit)."""
    out = BytesIO()
    Image.new("1", (10_000, 10_000)).save(out, "PNG")
    return out.getvalue()


def upload_too_much(server: Server, chunked: bool) -> tuple[int, Any]:
    """POST over the server's 1 MB: a Content-Length that says so and no body (the server must answer
    before reading one), or a chunked body (no length declared) sent up to just past the limit."""
    host, port = server.url.split("/")[2].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Type", "image/jpeg")
    if chunked:
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        for _ in range(17):  # 17 × 64 KiB: the last chunk passes 1 MB, and nothing after it
            connection.send(b"10000\r\n" + os.urandom(65536) + b"\r\n")
    else:
        connection.putheader("Content-Length", "5000000")
        connection.endheaders()
    response = connection.getresponse()
    try:
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_bad_requests_are_clear_json_errors_and_the_server_lives_on(server: Server, tmp_path: Path) -> None:
    predict = server.url + "predict"
    status, answer = call(predict, *multipart([("notes.txt", b"not an image at all")]))
    assert status == 415
    assert "notes.txt" in answer["error"] and "not an image" in answer["error"]

    status, answer = call(predict, *multipart([("bomb.png", bomb())]))
    assert status == 415
    assert "decompression bomb" in answer["error"]

    out = BytesIO()
    Image.new("F", (8, 8), 5.0).save(out, "TIFF")  # decodes, but float grey outside 0..1 has no colours
    status, answer = call(predict, *multipart([("grey.tif", out.getvalue())]))
    assert status == 422
    assert "outside 0..1" in answer["error"]

    assert call(predict + "?top_k=0", BEE.read_bytes(), "image/jpeg")[0] == 400
    body, content_type = multipart([])  # a form with no field at all
    assert call(predict, body, content_type)[0] == 400
    assert call(predict, *multipart([("", b"")]))[0] == 400  # the browser's form with no file chosen
    assert call(predict, *multipart([("bee.jpg", BEE.read_bytes())], field="image"))[0] == 400
    assert call(predict, b"", "image/jpeg")[0] == 400

    status, answer = upload_too_much(server, chunked=False)
    assert status == 413
    assert "--max-upload-mb" in answer["error"]
    assert upload_too_much(server, chunked=True)[0] == 413

    assert post_files(server, BEE)[0] == 200


def test_health_answers_while_a_slow_predict_runs(run_dir: Path) -> None:
    server, _ = start(run_dir, "--max-upload-mb", "100")
    try:
        slow: dict[str, Any] = {}
        images = [BEE] * 300  # long enough to poll /health many times on a fast host too
        worker = threading.Thread(target=lambda: slow.update(answer=post_files(server, *images)))
        started = time.monotonic()
        worker.start()
        latencies = []
        while worker.is_alive():
            begin = time.monotonic()
            status, _ = call(server.url + "health")
            latencies.append(time.monotonic() - begin)
            assert status == 200
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        worker.join()
        status, answer = slow["answer"]
        assert status == 200 and len(answer["predictions"]) == len(images)
        # a blocked event loop would answer /health once, after the predict: here it answers throughout
        # (ten answers, 50 ms apart at least, also show that the predict ran long enough to tell)
        assert len(latencies) >= 10 and max(latencies) < 1.0, (elapsed, sorted(latencies)[-5:])
        print(f"predict {elapsed:.1f} s, /health {len(latencies)}× max {max(latencies):.3f} s")
    finally:
        stop(server)


def test_a_port_in_use_is_one_line_and_exit_code_2(run_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_tlx("serve", run_dir, "--port", port)
    assert result.returncode == 2
    assert result.stderr.startswith(f"tlx: error: --host 127.0.0.1 --port {port}: cannot listen there")
    assert len(result.stderr.splitlines()) == 1


def test_the_load_benchmark_reports_each_level(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    bench = [sys.executable, REPO / "bench" / "serve_load.py", run_dir, "--requests", "6", "--json", out]
    result = subprocess.run(bench, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [(r["clients"], r["requests"]) for r in rows] == [(1, 6), (4, 6), (16, 6)]
    assert all(r["requests_per_s"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"] for r in rows)
    assert "| 16 | 6 |" in result.stdout


class StandIn:
    """What the app reads of a classifier before any request: its folder and classes."""

    folder = Path("runs/demo")
    classes: ClassVar[list[str]] = ["ants", "bees"]


def asgi_get(app: Any, path: str) -> tuple[int, Any]:
    """``(status, JSON)`` of a GET sent straight to an ASGI app, without a socket."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": []}
    anyio.run(app, scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("192.168.1.5", False)],
)
def test_health_tells_the_page_when_other_machines_can_reach_the_server(host: str, loopback: bool) -> None:
    from tlx.serve import create_app

    app = create_app(StandIn(), max_upload_bytes=10**6, host=host)  # type: ignore[arg-type]
    status, health = asgi_get(app, "/health")
    assert status == 200
    assert (health["host"], health["loopback"]) == (host, loopback)
