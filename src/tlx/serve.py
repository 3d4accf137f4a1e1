"""``tlx serve``: a trained run's classifier over HTTP (Starlette, run by uvicorn) with a small web page.

No model code here: images go to the Python API's :class:`tlx.api.Classifier`, so ``POST /predict``
gives the numbers of ``tlx predict``. The model runs in a worker thread, one call at a time (feature
extraction sets torch's global thread count), so the event loop keeps answering ``/health`` and the page.
Uploads are decoded in that call too, so one request's decoded images are in memory at a time, and
they are bounded: :data:`MAX_FILES`, :data:`MAX_IMAGE_PIXELS`, :data:`MAX_REQUEST_PIXELS`.
"""

from __future__ import annotations

import csv
import ipaddress
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

import uvicorn
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import parse_options_header  # the parser Starlette's forms use
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from tlx.api import Classifier
from tlx.data import opened
from tlx.errors import TlxError, describe, shorten
from tlx.runfiles import METRICS_FILE, PREDICTIONS_FILE, PROVENANCE_FILE, read_metrics, read_provenance
from tlx.version import __version__

#: the multipart form field that carries the images (repeatable)
FIELD = "file"
#: labels per image in ``top_k`` unless the request asks for another number (``?top_k=N``)
TOP_K = 5
#: the most files (form parts) one request may carry
MAX_FILES = 256
#: the most pixels one image may decode to: 40 megapixels; the model sees a few hundred pixels a side
MAX_IMAGE_PIXELS = 40_000_000
#: the most pixels the images of one request may decode to together (about 400 MB as RGB)
MAX_REQUEST_PIXELS = 100_000_000
#: example images of each class the page offers from the run's test split (``GET /examples``)
EXAMPLES_PER_CLASS = 2
#: the ``Host`` names a server on a loopback address answers besides its ``--host`` and ``--allow-host``:
#: a page from elsewhere that a browser sends here under its own name (DNS rebinding) is refused
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


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


def trusted_hosts(host: str, allow: Iterable[str] = ()) -> list[str]:
    """The ``Host`` names the server answers when it listens on ``host``: :data:`LOOPBACK_HOSTS`,
    ``host`` itself and the ``allow`` names (``--allow-host``); any name (``*``) on a wildcard address
    (``0.0.0.0``, ``::``) unless ``allow`` names some, as such a server has no one name to check."""
    names = [_host_pattern(name) for name in allow]
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard and not names:
        return ["*"]
    return list(dict.fromkeys([*LOOPBACK_HOSTS, _bracketed(host.lower()), *names]))


def _host_pattern(name: str) -> str:
    """An ``--allow-host`` value as Starlette's ``TrustedHostMiddleware`` matches it: a host name or
    address without port (IPv6 in brackets, as a ``Host`` header has it), ``*.domain`` or ``*``."""
    text = _bracketed(name.strip().lower())
    if text == "*" or re.fullmatch(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\]", text):
        return text
    raise TlxError(
        f"--allow-host {shorten(name)!r}: expected a host name or address without port "
        "(myhost.lan, 192.168.1.5, ::1, *.example.com, or * for any)"
    )


def _bracketed(host: str) -> str:
    """``host`` as a ``Host`` header names it: an IPv6 address in brackets, compressed."""
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return host
    return f"[{address}]" if address.version == 6 else str(address)


def create_app(
    classifier: Classifier,
    *,
    max_upload_bytes: int,
    host: str = "127.0.0.1",
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The web app: the page (``GET /``), its API (``/health``, ``/info``, ``/examples``, ``POST
    /predict``) and the API's description (``/openapi.json``, and ``/docs`` for people); a request
    whose ``Host`` is not among ``allowed_hosts`` (default: :func:`trusted_hosts` of ``host``) gets 400."""
    if allowed_hosts is None:
        allowed_hosts = trusted_hosts(host)
    lock = threading.Lock()
    pages = {name: _page(name) for name in ("index.html", "docs.html")}
    examples = examples_of(classifier.folder, EXAMPLES_PER_CLASS, max_upload_bytes)
    schema = SchemaGenerator({"openapi": "3.0.3", "info": {"title": "tlx serve", "version": __version__}})
    health = {
        "status": "ok",
        "run": classifier.folder.name,
        "classes": classifier.classes,
        "host": host,
        "loopback": is_loopback(host),
        "max_upload_bytes": max_upload_bytes,
    }

    def answers(uploads: list[tuple[str, bytes]], top_k: int) -> list[dict[str, Any]]:
        sizes = _sizes(uploads)  # from the headers: a request over the limits is refused undecoded
        with lock:  # one request's decoded images in memory at a time
            images = [_decode(name, data, size) for (name, data), size in zip(uploads, sizes)]
            results, skipped = classifier.top_k(images, top_k)
        if skipped:
            raise BadRequest(415, f"an image could not be classified ({skipped[0][1]})")
        return [
            {"file": name, **{k: v for k, v in result.items() if k != "path"}}
            for (name, _), result in zip(uploads, results)
        ]

    async def index(request: Request) -> Response:
        return HTMLResponse(pages["index.html"])

    async def docs(request: Request) -> Response:
        return HTMLResponse(pages["docs.html"])

    async def openapi(request: Request) -> Response:
        return JSONResponse(schema.get_schema(routes=request.app.routes))

    async def get_health(request: Request) -> Response:
        """---
        summary: Whether the server answers, and where it listens
        responses:
          200:
            description: "status ok, the run folder's name, its classes, the address the server listens
              on, whether only this machine can reach it (loopback), the upload limit in bytes"
        x-curl: curl {url}/health
        """
        return JSONResponse(health)

    async def info(request: Request) -> Response:
        """---
        summary: The model card
        description: "What was trained, from the run folder: backbone, head, test accuracy, classes,
          when and from which recipe, how it tells an unknown image (null where the run did not record it)."
        responses:
          200: {description: "run, recipe, trained (UTC), backbone, head, strategy, test_accuracy, n_train,
            n_test, classes, calibration, unknown, tlx_version"}
        x-curl: curl {url}/info
        """
        return JSONResponse(await run_in_threadpool(model_card, classifier))

    async def list_examples(request: Request) -> Response:
        """---
        summary: Example images from the run's test split
        description: "A few images of each class (none where the dataset is no longer on disk), each by
          its id: GET /examples/{id} gives the image."
        responses:
          200: {description: "examples: a list of {id, label, file}"}
        x-curl: curl {url}/examples
        """
        listed = [{"id": i, "label": e.label, "file": e.path.name} for i, e in enumerate(examples)]
        return JSONResponse({"examples": listed})

    async def example(request: Request) -> Response:
        """---
        summary: One example image, by its id in /examples
        parameters:
          - {name: id, in: path, required: true, schema: {type: integer, minimum: 0}}
        responses:
          200: {description: the image file}
          404: {description: "no example of this id, or its file is gone"}
        x-curl: curl -o example.jpg {url}/examples/0
        """
        index = request.path_params["id"]
        if index >= len(examples) or not examples[index].path.is_file():
            raise BadRequest(404, f"no example {index}: GET /examples lists them")
        return FileResponse(examples[index].path)

    async def predict(request: Request) -> Response:
        """---
        summary: Classify images
        description: "The images as the repeatable multipart field 'file', or one image as the raw body.
          Each prediction: file, label, probability, top_k, and with the run's calibration known (false:
          the image looks like none of the classes) and ood_score. latency_ms: the time the server took
          for the request, in milliseconds."
        parameters:
          - name: top_k
            in: query
            description: labels per image, at most the number of classes
            schema: {type: integer, minimum: 1, default: 5}
        requestBody:
          content:
            multipart/form-data:
              schema:
                type: object
                properties:
                  file: {type: array, items: {type: string, format: binary}}
            image/*:
              schema: {type: string, format: binary}
        responses:
          200: {description: "predictions (one per image, in order) and latency_ms"}
          400: {description: "a malformed request or top_k; error says why"}
          413: {description: "over the upload, pixel or file limits; error says which"}
          415: {description: "a file that is not an image; error names it"}
          422: {description: "an image that decodes but cannot be classified"}
        x-curl: curl -F file=@photo.jpg -F file=@another.jpg '{url}/predict?top_k=3'
        """
        started = time.perf_counter()
        top_k = _top_k(request, len(classifier.classes))
        uploads = await _uploads(request, max_upload_bytes)
        try:
            predictions = await run_in_threadpool(answers, uploads, top_k)
        except TlxError as exc:
            raise BadRequest(422, str(exc)) from None
        latency = round(1000 * (time.perf_counter() - started), 1)
        return JSONResponse({"predictions": predictions, "latency_ms": latency})

    async def refuse(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BadRequest)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def fail(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"internal error: {describe(exc)}"}, status_code=500)

    return Starlette(
        routes=[
            Route("/", index, methods=["GET"], include_in_schema=False),
            Route("/docs", docs, methods=["GET"], include_in_schema=False),
            Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
            Route("/health", get_health, methods=["GET"]),
            Route("/info", info, methods=["GET"]),
            Route("/examples", list_examples, methods=["GET"]),
            Route("/examples/{id:int}", example, methods=["GET"]),
            Route("/predict", predict, methods=["POST"]),
        ],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts, www_redirect=False)],
        exception_handlers={BadRequest: refuse, Exception: fail},
    )


def _page(name: str) -> str:
    """A page of the package's ``web`` folder."""
    return (resources.files("tlx") / "web" / name).read_text(encoding="utf-8")


def model_card(classifier: Classifier) -> dict[str, Any]:
    """What the page's model card shows, from the run's ``metrics.json`` and ``provenance.json``:
    the backbone, head and test accuracy, when and from which recipe the run was trained, how its
    probabilities are calibrated and how it tells an image of none of the classes (None where the run
    did not record it: a run of an older tlx)."""
    folder = classifier.folder
    metrics = read_metrics(folder / METRICS_FILE).model_dump()
    provenance = read_provenance(folder / PROVENANCE_FILE).model_dump()
    return {
        "run": folder.name,
        "recipe": provenance.get("recipe"),
        "trained": provenance.get("trained"),
        "backbone": metrics.get("backbone", {}).get("name"),
        "head": metrics.get("head"),
        "strategy": metrics.get("strategy"),
        "test_accuracy": metrics["test_accuracy"],
        "n_train": metrics["n_train"],
        "n_test": metrics.get("n_test"),
        "classes": classifier.classes,
        "calibration": _keys(metrics.get("calibration"), "temperature", "ece", "ece_uncalibrated"),
        "unknown": _keys(metrics.get("ood"), "method", "threshold", "accept"),
        "tlx_version": metrics.get("tlx_version"),
    }


def _keys(section: dict[str, Any] | None, *keys: str) -> dict[str, Any] | None:
    """``keys`` of a section of ``metrics.json``; None for a section the run did not write."""
    return None if section is None else {key: section.get(key) for key in keys}


class Example(NamedTuple):
    """An image of the run's test split that the page offers to classify."""

    label: str
    path: Path


def examples_of(folder: Path, per_class: int, max_bytes: int) -> list[Example]:
    """Up to ``per_class`` images of each class of the run's test split, in the order its
    ``predictions.csv`` lists them: those still on disk and within the upload limit of ``max_bytes``.
    None where the listing or the dataset is gone: examples are a convenience, not a reason to refuse."""
    try:
        with (folder / PREDICTIONS_FILE).open(newline="", encoding="utf-8") as listing:
            rows = [(row.get("path"), row.get("true_label")) for row in csv.DictReader(listing)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    chosen: list[Example] = []
    counts: Counter[str] = Counter()
    for path, label in rows:
        if path and label and counts[label] < per_class and _file_of_at_most(Path(path), max_bytes):
            chosen.append(Example(label, Path(path)))
            counts[label] += 1
    return chosen


def _file_of_at_most(path: Path, size: int) -> bool:
    try:
        return path.is_file() and path.stat().st_size <= size
    except OSError:
        return False


def _top_k(request: Request, classes: int) -> int:
    """``?top_k=N`` (default :data:`TOP_K`), at most the number of classes."""
    text = request.query_params.get("top_k", str(TOP_K))
    if not re.fullmatch(r"[0-9]{1,6}", text) or int(text) < 1:  # ASCII digits: int() takes '²' and '٣' too
        raise BadRequest(400, f"top_k={shorten(text)!r}: expected a whole number of labels from 1 to 999999")
    return min(int(text), classes)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes: the declared Content-Length
    before anything is read, and the bytes as they arrive (a chunked body declares no length)."""
    too_big = BadRequest(413, f"upload over the limit of {_mb(limit)} (tlx serve --max-upload-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:  # an answer no one reads, but no traceback in the server's log
        raise BadRequest(400, "the client went away before sending the whole body") from None
    return b"".join(chunks)


async def _uploads(request: Request, limit: int) -> list[tuple[str, bytes]]:
    """The uploaded files, named: the ``file`` fields of a multipart form, or a raw body."""
    body = await _body(request, limit)
    media_type, options = parse_options_header(request.headers.get("content-type"))  # lower case
    if media_type not in (b"multipart/form-data", b"application/x-www-form-urlencoded"):
        if not body:
            raise BadRequest(400, f"no image: send a multipart form with a '{FIELD}' field, or a raw image")
        return [("body", body)]
    boundary = options.get(b"boundary")
    parts = body.count(b"--" + boundary) - 1 if boundary else 0  # each part opens with it, the end too
    if parts > MAX_FILES:
        raise BadRequest(413, f"a form of {parts} parts: over the limit of {MAX_FILES} files per request; "
                              "send fewer at a time")  # fmt: skip

    async def receive() -> dict[str, Any]:  # the form parser reads the body already read and capped
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = Request(request.scope, receive).form(max_files=MAX_FILES, max_fields=MAX_FILES)
        async with form as fields:
            files = [f for f in fields.getlist(FIELD) if isinstance(f, UploadFile)]
            uploads = [(f.filename or FIELD, await f.read()) for f in files]
    except HTTPException as exc:  # a malformed form, as starlette reports it
        raise BadRequest(400, f"malformed form: {exc.detail}") from None
    uploads = [(name, data) for name, data in uploads if data]  # a form sent with no file chosen
    if not uploads:
        raise BadRequest(400, f"no file: the form has no non-empty '{FIELD}' field")
    return uploads


#: why an image over :data:`MAX_IMAGE_PIXELS` is refused, and what to do
_OVER_IMAGE = f"over the limit of {MAX_IMAGE_PIXELS / 1e6:g} megapixels per image; send a smaller image"


def _sizes(uploads: list[tuple[str, bytes]]) -> list[tuple[int, int]]:
    """Each upload's width and height as its header gives them (nothing decoded); 413 for an image over
    :data:`MAX_IMAGE_PIXELS`, or the one that takes the request over :data:`MAX_REQUEST_PIXELS`."""
    sizes, total = [], 0
    for name, data in uploads:
        with _reading(name), opened(BytesIO(data)) as image:
            width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise BadRequest(413, f"{shorten(name)}: {width}×{height} pixels, {_OVER_IMAGE}")
        total += width * height
        if total > MAX_REQUEST_PIXELS:
            raise BadRequest(
                413,
                f"{shorten(name)}: the images up to this one make {total / 1e6:.0f} megapixels, over the "
                f"limit of {MAX_REQUEST_PIXELS / 1e6:g} per request; send fewer at a time",
            )
        sizes.append((width, height))
    return sizes


def _decode(name: str, data: bytes, size: tuple[int, int]) -> Image.Image:
    """``data`` decoded in memory; refused unless it decodes to ``size``, the size its header gave."""
    with _reading(name), opened(BytesIO(data)) as image:
        image.load()
    if image.size != size:
        raise BadRequest(415, f"{shorten(name)}: decodes to {image.width}×{image.height} pixels, not the "
                              f"{size[0]}×{size[1]} of its header")  # fmt: skip
    return image


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """Pillow's failures on the upload ``name`` as refusals: over its decompression-bomb limit (above
    :data:`MAX_IMAGE_PIXELS`) 413, anything else 415."""
    try:
        yield
    except Image.DecompressionBombError:
        raise BadRequest(413, f"{shorten(name)}: {_OVER_IMAGE}") from None
    except UnidentifiedImageError:  # its message names the file object: <_io.BytesIO object at 0x…>
        raise BadRequest(415, f"{shorten(name)}: not an image PIL can read (no format it knows)") from None
    except Exception as exc:  # PIL raises many types for damaged or foreign files
        raise BadRequest(415, f"{shorten(name)}: not an image PIL can read ({describe(exc)})") from None


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


def serve(
    run_dir: Path,
    host: str,
    port: int,
    max_upload_mb: float,
    allow_hosts: Iterable[str],
    ready: Callable[[str], None],
) -> None:
    """Load the run, listen on ``host:port`` and answer until interrupted; ``ready(url)`` once listening.
    ``allow_hosts``: ``Host`` names answered besides those of :func:`trusted_hosts`."""
    from tlx.api import load

    allowed = trusted_hosts(host, allow_hosts)
    sock = bind(host, port)  # before the model loads: a port in use is reported at once
    with sock:
        classifier = load(run_dir)
        app = create_app(
            classifier, max_upload_bytes=int(max_upload_mb * 1e6), host=host, allowed_hosts=allowed
        )

        class Server(uvicorn.Server):
            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets)
                if not self.should_exit:
                    ready(url(sock))

        Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
