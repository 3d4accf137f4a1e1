"""``tlx serve``: a trained run's classifier over HTTP (Starlette, run by uvicorn) with a small web page.

No model code here: images go to the Python API's :class:`tlx.api.Classifier`, so ``POST /predict``
gives the numbers of ``tlx predict``. The model runs in a worker thread, one call at a time (feature
extraction sets torch's global thread count), so the event loop keeps answering ``/health`` and the page.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from importlib import resources
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tlx.api import Classifier
from tlx.data import opened
from tlx.errors import TlxError, describe

#: the multipart form field that carries the images (repeatable)
FIELD = "file"
#: labels per image in ``top_k`` unless the request asks for another number (``?top_k=N``)
TOP_K = 5


class BadRequest(Exception):
    """A request the server refuses: an HTTP status and a one-line reason, sent as JSON."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """Whether ``host`` only answers this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(classifier: Classifier, *, max_upload_bytes: int, host: str = "127.0.0.1") -> Starlette:
    """The web app: ``GET /`` (the page), ``GET /health``, ``POST /predict``."""
    lock = threading.Lock()
    page = (resources.files("tlx") / "web" / "index.html").read_text(encoding="utf-8")
    health = {
        "status": "ok",
        "run": classifier.folder.name,
        "classes": classifier.classes,
        "host": host,
        "loopback": is_loopback(host),
        "max_upload_bytes": max_upload_bytes,
    }

    def probabilities(uploads: list[tuple[str, bytes]]) -> np.ndarray:
        images = [_decode(name, data) for name, data in uploads]  # in this worker thread too
        with lock:
            return classifier.predict_proba(images)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def get_health(request: Request) -> Response:
        return JSONResponse(health)

    async def predict(request: Request) -> Response:
        top_k = _top_k(request, len(classifier.classes))
        uploads = await _uploads(request, max_upload_bytes)
        try:
            rows = await run_in_threadpool(probabilities, uploads)
        except TlxError as exc:
            raise BadRequest(422, str(exc)) from None
        classes = classifier.classes
        predictions = []
        for (name, _), row in zip(uploads, rows.tolist()):
            order = sorted(range(len(classes)), key=lambda i: -row[i])[:top_k]
            ranked = [{"label": classes[i], "probability": row[i]} for i in order]
            predictions.append({"file": name, **ranked[0], "top_k": ranked})
        return JSONResponse({"predictions": predictions})

    async def refuse(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BadRequest)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def fail(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"internal error: {describe(exc)}"}, status_code=500)

    return Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/health", get_health, methods=["GET"]),
            Route("/predict", predict, methods=["POST"]),
        ],
        exception_handlers={BadRequest: refuse, Exception: fail},
    )


def _top_k(request: Request, classes: int) -> int:
    """``?top_k=N`` (default :data:`TOP_K`), at most the number of classes."""
    text = request.query_params.get("top_k", str(TOP_K))
    if not text.isdigit() or int(text) < 1:
        raise BadRequest(400, f"top_k={text!r}: expected a whole number of labels, 1 or more")
    return min(int(text), classes)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes: the declared Content-Length
    before anything is read, and the bytes as they arrive (a chunked body declares no length)."""
    too_big = BadRequest(413, f"upload over the limit of {_mb(limit)} (tlx serve --max-upload-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _uploads(request: Request, limit: int) -> list[tuple[str, bytes]]:
    """The uploaded files, named: the ``file`` fields of a multipart form, or a raw body."""
    body = await _body(request, limit)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        if not body:
            raise BadRequest(400, f"no image: send a multipart form with a '{FIELD}' field, or a raw image")
        return [("body", body)]

    async def receive() -> dict[str, Any]:  # the form parser reads the body already read and capped
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, receive).form() as form:
            files = [f for f in form.getlist(FIELD) if isinstance(f, UploadFile)]
            uploads = [(f.filename or FIELD, await f.read()) for f in files]
    except HTTPException as exc:  # a malformed form, as starlette reports it
        raise BadRequest(400, f"malformed form: {exc.detail}") from None
    uploads = [(name, data) for name, data in uploads if data]  # a form sent with no file chosen
    if not uploads:
        raise BadRequest(400, f"no file: the form has no non-empty '{FIELD}' field")
    return uploads


def _decode(name: str, data: bytes) -> Image.Image:
    """``data`` decoded in memory; not an image, or over Pillow's decompression-bomb limit, is a 415."""
    try:
        with opened(BytesIO(data)) as image:
            image.load()
    except Image.DecompressionBombError as exc:
        raise BadRequest(415, f"{name}: refused as a decompression bomb ({describe(exc)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadRequest(415, f"{name}: not an image Pillow can decode ({describe(exc)})") from None
    return image


def _mb(n: int) -> str:
    return f"{n / 1e6:g} MB"


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (port 0: one the system picks), or a :class:`TlxError`."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise TlxError(f"--host {host}: cannot use this address ({describe(exc)})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise TlxError(f"--host {host} --port {port}: cannot listen there ({describe(exc)}); "
                       "choose another --port") from None  # fmt: skip
    return sock


def url(sock: socket.socket) -> str:
    """The address a browser opens for ``sock``."""
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/"


def serve(run_dir: Path, host: str, port: int, max_upload_mb: float, ready: Callable[[str], None]) -> None:
    """Load the run, listen on ``host:port`` and answer until interrupted; ``ready(url)`` once listening."""
    from tlx.api import load

    sock = bind(host, port)  # first: a port in use is reported before the model loads
    with sock:
        classifier = load(run_dir)
        app = create_app(classifier, max_upload_bytes=int(max_upload_mb * 1e6), host=host)

        class Server(uvicorn.Server):
            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets)
                if not self.should_exit:
                    ready(url(sock))

        Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
