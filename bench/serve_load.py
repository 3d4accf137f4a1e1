"""Load on ``tlx serve``: requests/s and p50/p95 latency of ``POST /predict`` at 1, 4 and 16 clients.

    .venv/bin/python bench/serve_load.py RUN_DIR [--image IMG] [--requests 200] [--seconds 60] [--json OUT]

Starts ``tlx serve RUN_DIR`` on a free port of 127.0.0.1 (loopback only) and, for each number of
concurrent clients, sends one image per request (a multipart form, as the page does) over kept-alive
connections until ``--requests`` requests have been answered or ``--seconds`` have passed, whichever
comes first. A few requests first warm the server up; they are not counted. Every answer must be 200.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hymenoptera_data"
DEFAULT_IMAGE = DATA / "val" / "bees" / "1032546534_06907fe3b3.jpg"
CLIENTS = (1, 4, 16)
WARM_UP = 5
#: the figures of one level, in the table's order
ROW = ("clients", "requests", "seconds", "requests_per_s", "p50_ms", "p95_ms")


def form(image: Path) -> tuple[bytes, str]:
    """A multipart body with the image as its ``file`` field, and its content type."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{image.name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + image.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def post(connection: http.client.HTTPConnection, body: bytes, content_type: str) -> None:
    connection.request("POST", "/predict", body, {"Content-Type": content_type})
    response = connection.getresponse()
    answer = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {answer[:200]!r}")


def load(port: int, clients: int, body: bytes, content_type: str, requests: int, seconds: float) -> dict:
    """``clients`` threads posting until ``requests`` answers or ``seconds``; the figures."""
    latencies: list[float] = []
    issued = 0  # requests claimed by a client: never more than ``requests``
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds
    errors: list[BaseException] = []

    def client() -> None:
        nonlocal issued
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if issued >= requests:
                        return
                    issued += 1
                begin = time.perf_counter()
                post(connection, body, content_type)
                with lock:
                    latencies.append(time.perf_counter() - begin)
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(1000 * cuts[49], 1),
        "p95_ms": round(1000 * cuts[94], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--requests", type=int, default=200, help="answered requests per level (at most)")
    parser.add_argument("--seconds", type=float, default=60, help="time per level (at most)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.requests < 2:
        parser.error("--requests: at least 2, for the percentiles")

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "tlx", "serve", str(args.run_dir), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = server.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not found:
            sys.exit(f"tlx serve did not start: {line!r}")
        port = int(found.group(1))
        body, content_type = form(args.image)
        warm = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for _ in range(WARM_UP):
            post(warm, body, content_type)
        warm.close()
        rows = [load(port, c, body, content_type, args.requests, args.seconds) for c in CLIENTS]
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"{os.cpu_count()} CPUs, Python {platform.python_version()}, image {args.image.name}")
    print("| clients | requests | seconds | requests/s | p50 ms | p95 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in ROW) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
