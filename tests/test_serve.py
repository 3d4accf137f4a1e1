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
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
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
#: a typical bee, known to the module's run; a cat, which looks like none of its classes
TYPICAL_BEE = HYMENOPTERA / "val" / "bees" / "2321144482_f3785ba7b2.jpg"
CAT = HYMENOPTERA.parent / "catsdogs" / "val" / "cats" / "cat.4213.jpg"


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
    """A quick EfficientNet-Lite0 run on some ants and bees (offline: its weights ship with its plugin),
    with enough training images that its calibration calls typical ants and bees known."""
    tmp = tmp_path_factory.mktemp("serve")
    data = small_hymenoptera(tmp / "data", (20, 3))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        run = tlx.fit(LITE0, [f"dataset.root={data}", "train.epochs=2"], out=tmp / "run", cache_dir=tmp / "c")
    return run.folder


@pytest.fixture(scope="module")
def server(run_dir: Path) -> Iterator[Server]:
    """One server for the module, with a 1 MB upload limit, that also answers the host name tlx.test."""
    server, _ = start(run_dir, "--max-upload-mb", "1", "--allow-host", "tlx.test")
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


def call(
    url: str, body: bytes | None = None, content_type: str | None = None, host: str | None = None
) -> tuple[int, Any]:
    """``(status, JSON)`` of a GET (no body) or POST, or ``(status, bytes)`` of an answer not JSON;
    ``host``: the ``Host`` header, if not the URL's."""
    headers = {"Content-Type": content_type} if content_type else {}
    if host:
        headers["Host"] = host
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        return exc.code, json.loads(text) if exc.headers.get_content_type() == "application/json" else text


def post_files(server: Server, *paths: Path) -> tuple[int, Any]:
    return call(server.url + "predict", *multipart((p.name, p.read_bytes()) for p in paths))


def test_predictions_are_those_of_tlx_predict(server: Server, run_dir: Path) -> None:
    cli = run_tlx("predict", run_dir, BEE, ANT, TYPICAL_BEE, CAT, "--json", "--top-k", "2")
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)

    status, answer = post_files(server, BEE, ANT, TYPICAL_BEE, CAT)
    assert status == 200, answer
    got = answer["predictions"]
    assert [p["file"] for p in got] == [BEE.name, ANT.name, TYPICAL_BEE.name, CAT.name]
    assert [p["known"] for p in got[2:]] == [True, False]  # the run's calibration says "unknown" of a cat
    assert 0 < answer["latency_ms"] < 120_000
    for mine, theirs in zip(got, expected):
        assert (mine["label"], mine["known"]) == (theirs["label"], theirs["known"])
        assert mine["probability"] == pytest.approx(theirs["probability"], abs=1e-6)
        assert mine["ood_score"] == pytest.approx(theirs["ood_score"], abs=1e-6)
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


def test_the_pages_load_nothing_from_elsewhere(server: Server) -> None:
    for path, mark in (("", 'type="file"'), ("docs", "openapi.json")):
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            page = response.read().decode()
        assert mark in page
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
        assert not re.search(r"""(fetch|import)\(["'](https?:)?//""", page)


def test_info_is_the_model_card_of_the_run(server: Server, run_dir: Path) -> None:
    status, info = call(server.url + "info")
    assert status == 200
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert info["run"] == run_dir.name
    assert (info["backbone"], info["head"], info["strategy"]) == (
        "tf_efficientnet_lite0.pypi",
        "linear",
        "features",
    )
    assert info["test_accuracy"] == metrics["test_accuracy"]
    assert (info["n_train"], info["n_test"], info["classes"]) == (40, 6, ["ants", "bees"])
    assert info["recipe"] == "hymenoptera-lite0.yaml"
    trained = datetime.fromisoformat(info["trained"])
    assert timedelta(0) <= datetime.now(timezone.utc) - trained < timedelta(hours=1)
    assert info["unknown"] == {k: metrics["ood"][k] for k in ("method", "threshold", "accept")}
    assert info["calibration"]["temperature"] == metrics["calibration"]["temperature"]


def test_examples_are_two_per_class_of_the_test_split_by_id_only(server: Server, run_dir: Path) -> None:
    status, answer = call(server.url + "examples")
    assert status == 200
    examples = answer["examples"]
    assert [(e["id"], e["label"]) for e in examples] == [(0, "ants"), (1, "ants"), (2, "bees"), (3, "bees")]
    test_split = {p.name: p for p in (run_dir.parent / "data" / "val").rglob("*.jpg")}
    with urllib.request.urlopen(server.url + "examples/2", timeout=30) as response:
        assert response.headers.get_content_type() == "image/jpeg"
        assert response.read() == test_split[examples[2]["file"]].read_bytes()
    status, answer = call(server.url + "examples/4")
    assert (status, answer) == (404, {"error": "no example 4: GET /examples lists them"})
    for other in ("-1", "1.0", "x", "..%2F..%2Frecipe.yaml", "%2Fetc%2Fpasswd", "0/../../recipe.yaml"):
        assert call(server.url + "examples/" + other)[0] == 404, other


def test_without_its_dataset_a_run_has_no_examples_and_serves_on(tmp_path: Path) -> None:
    from tlx.serve import create_app

    gone = tmp_path / "gone.jpg"
    listing = f"path,true_label,predicted_label,p_ants,p_bees\n{gone},ants,ants,1,0\n"
    (tmp_path / "predictions.csv").write_text(listing)

    class Moved(StandIn):
        folder = tmp_path

    for stand_in in (Moved(), StandIn()):  # a listing of files that are gone; no listing at all
        app = create_app(stand_in, max_upload_bytes=10**6)  # type: ignore[arg-type]
        assert asgi_get(app, "/examples") == (200, {"examples": []})
        assert asgi_get(app, "/examples/0")[0] == 404


def test_openapi_describes_each_endpoint_with_a_curl_example(server: Server) -> None:
    from tlx.serve import TOP_K

    status, schema = call(server.url + "openapi.json")
    assert status == 200
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    assert sorted(paths) == ["/examples", "/examples/{id}", "/health", "/info", "/predict"]
    assert all(op["x-curl"].startswith("curl ") for methods in paths.values() for op in methods.values())
    (top_k,) = paths["/predict"]["post"]["parameters"]
    assert (top_k["name"], top_k["schema"]["default"]) == ("top_k", TOP_K)
    assert {"multipart/form-data", "image/*"} == set(paths["/predict"]["post"]["requestBody"]["content"])


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


def dds_of_unknown_pixel_format() -> bytes:
    """A DDS file whose pixel format flags Pillow does not know: it raises NotImplementedError."""
    out = BytesIO()
    Image.new("RGB", (8, 8)).save(out, "DDS")
    data = bytearray(out.getvalue())
    data[80:84] = (0x2000).to_bytes(4, "little")  # the pixel format's flags
    return bytes(data)


def test_bad_requests_are_clear_json_errors_and_the_server_lives_on(server: Server, tmp_path: Path) -> None:
    predict = server.url + "predict"
    status, answer = call(predict, *multipart([("notes.txt", b"not an image at all")]))
    assert status == 415
    assert answer["error"] == "notes.txt: not an image PIL can read (no format it knows)"

    status, answer = call(predict, *multipart([("odd.dds", dds_of_unknown_pixel_format())]))
    assert status == 415
    assert answer["error"].startswith("odd.dds: not an image PIL can read (NotImplementedError: ")

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
    assert call(predict, b"--x--\r\n", "multipart/form-data")[0] == 400  # no boundary

    status, answer = upload_too_much(server, chunked=False)
    assert status == 413
    assert "--max-upload-mb" in answer["error"]
    assert upload_too_much(server, chunked=True)[0] == 413

    assert post_files(server, BEE)[0] == 200


def png(width: int, height: int) -> bytes:
    """A black 1-bit PNG: a few kilobytes however many pixels it has."""
    out = BytesIO()
    Image.new("1", (width, height)).save(out, "PNG")
    return out.getvalue()


def test_uploads_over_the_pixel_and_file_limits_are_413_naming_the_file(server: Server) -> None:
    from tlx.serve import MAX_FILES

    predict = server.url + "predict"
    status, answer = call(predict, *multipart([("bee.jpg", BEE.read_bytes()), ("wide.png", png(9000, 9000))]))
    assert status == 413
    assert answer["error"] == (
        "wide.png: 9000×9000 pixels, over the limit of 40 megapixels per image; send a smaller image"
    )
    status, answer = call(predict, *multipart([("bomb.png", bomb())]))  # over Pillow's own limit too
    assert (status, answer["error"]) == (413, "bomb.png: over the limit of 40 megapixels per image; "
                                              "send a smaller image")  # fmt: skip

    three = [(f"{n}.png", png(6000, 6000)) for n in (1, 2, 3)]  # 36 megapixels each, 108 together
    status, answer = call(predict, *multipart(three))
    assert status == 413
    assert answer["error"].startswith("3.png: the images up to this one make 108 megapixels, over the "
                                      "limit of 100 per request")  # fmt: skip

    status, answer = call(predict, *multipart([(f"{n}.png", png(1, 1)) for n in range(MAX_FILES + 1)]))
    assert status == 413
    assert f"over the limit of {MAX_FILES} files per request" in answer["error"]

    assert post_files(server, BEE)[0] == 200


def test_a_form_is_a_form_whatever_the_case_of_its_media_type(server: Server) -> None:
    body, content_type = multipart([(BEE.name, BEE.read_bytes()), (ANT.name, ANT.read_bytes())])
    mixed_case = content_type.replace("multipart/form-data", "Multipart/Form-Data")
    status, answer = call(server.url + "predict", body, mixed_case)
    assert status == 200, answer
    assert [p["file"] for p in answer["predictions"]] == [BEE.name, ANT.name]


@pytest.mark.parametrize("top_k", ["²", "٣", "9" * 5000, "-1", " 1", "1e3", ""])
def test_top_k_other_than_ascii_digits_is_a_400_of_one_line(server: Server, top_k: str) -> None:
    query = urllib.parse.urlencode({"top_k": top_k})
    status, answer = call(server.url + "predict?" + query, BEE.read_bytes(), "image/jpeg")
    assert status == 400
    assert answer["error"].startswith("top_k=") and "whole number of labels" in answer["error"]
    assert len(answer["error"]) < 400 and "\n" not in answer["error"]


def test_requests_for_other_host_names_are_refused_on_loopback(server: Server) -> None:
    port = server.url.split(":")[2].rstrip("/")
    health = server.url + "health"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", f"tlx.test:{port}"):
        assert call(health, host=host)[0] == 200, host
    for host in (f"rebound.example:{port}", "localhost.example", "127.0.0.2", "tlx.test.example"):
        assert call(health, host=host) == (400, b"Invalid host header"), host
        assert call(server.url + "predict", BEE.read_bytes(), "image/jpeg", host=host)[0] == 400


def test_health_answers_while_a_slow_predict_runs(run_dir: Path) -> None:
    from tlx.serve import MAX_FILES

    server, _ = start(run_dir, "--max-upload-mb", "100")
    try:
        slow: dict[str, Any] = {}
        images = [BEE] * MAX_FILES  # long enough to poll /health many times on a fast host too
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


@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "-1", "0", "1001", "lots"])
def test_max_upload_mb_out_of_range_is_one_line_naming_the_option(run_dir: Path, value: str) -> None:
    result = run_tlx("serve", run_dir, "--port", "0", "--max-upload-mb", value)
    assert result.returncode == 2
    assert (
        result.stderr == f"tlx: error: --max-upload-mb {value}: expected megabytes above 0 and at most 1000\n"
    )


@pytest.mark.parametrize("name", ["a b", "tlx.test:8000", "http://tlx.test", "a*.test", ""])
def test_an_allow_host_that_is_no_host_name_is_one_line(run_dir: Path, name: str) -> None:
    result = run_tlx("serve", run_dir, "--port", "0", "--allow-host", name)
    assert result.returncode == 2
    assert result.stderr.startswith(f"tlx: error: --allow-host {name!r}: expected a host name")
    assert len(result.stderr.splitlines()) == 1


def test_without_python_multipart_serve_says_what_to_install(tmp_path: Path) -> None:
    hide = "import sys; sys.modules['python_multipart'] = sys.modules['multipart'] = None; "
    launch = "from tlx.cli import main; sys.argv = ['tlx', 'serve', sys.argv[1], '--port', '0']; main()"
    command = [sys.executable, "-c", hide + launch, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr == "tlx: error: tlx serve needs python-multipart: pip install 'tlx-vision[serve]'\n"


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


def asgi_get(app: Any, path: str, host: str = "localhost", method: str = "GET") -> tuple[int, Any]:
    """``(status, body)`` of a request sent straight to an ASGI app, without a socket: JSON, or bytes.
    A POST's client goes away before sending any of its body."""
    sent: list[dict] = []

    async def receive() -> dict:
        if method == "POST":
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"host", host.encode())]
    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": headers}
    anyio.run(app, scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body) if sent[0]["status"] == 200 else body


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


@pytest.mark.parametrize(
    ("host", "allow", "answered", "refused"),
    [
        ("0.0.0.0", [], ["mybox.lan", "192.168.1.5:8000", "anything.example"], []),
        ("::", [], ["mybox.lan", "[fe80::1]"], []),
        ("0.0.0.0", ["mybox.lan", "*.corp.example"], ["mybox.lan", "a.corp.example:80", "localhost"],
         ["other.lan", "192.168.1.5"]),
        ("192.168.1.5", [], ["192.168.1.5:8000", "localhost"], ["mybox.lan", "rebound.example"]),
        ("::1", ["FE80::1"], ["[::1]:8000", "[fe80::1]", "127.0.0.1"], ["rebound.example"]),
        ("127.0.0.1", ["*"], ["rebound.example"], []),
    ],
)  # fmt: skip
def test_the_host_names_answered_on_each_address(
    host: str, allow: list[str], answered: list[str], refused: list[str]
) -> None:
    from tlx.serve import create_app, trusted_hosts

    allowed = trusted_hosts(host, allow)
    app = create_app(StandIn(), max_upload_bytes=10**6, host=host, allowed_hosts=allowed)  # type: ignore[arg-type]
    for name in answered:
        assert asgi_get(app, "/health", host=name)[0] == 200, name
    for name in refused:
        assert asgi_get(app, "/health", host=name) == (400, b"Invalid host header"), name


def test_a_client_that_goes_away_mid_upload_is_a_400_not_a_crash() -> None:
    from tlx.serve import create_app

    app = create_app(StandIn(), max_upload_bytes=10**6)  # type: ignore[arg-type]
    status, answer = asgi_get(app, "/predict", method="POST")
    assert status == 400
    assert json.loads(answer) == {"error": "the client went away before sending the whole body"}
