"""The HTTP face of a detserve application: request parsing, the error contract, the FastAPI app.

Every error a client can cause becomes ``{"error": {"code", "message"}}`` with a
4xx status and one stable ``code`` per cause (serve/protocol.py registers them
all, and the OpenAPI spec documents them from there); the message says what was
sent and what to send instead. Errors that Ray makes itself (unknown route,
overload, timeout, a replica that died) get the same body from serve/ray_errors.py.

The body is read as it arrives, with the byte limit checked on every chunk,
whatever the encoding (Content-Length or chunked, raw, JSON or multipart):
multipart is parsed by python-multipart's streaming parser from those same
chunks, so an oversized upload costs at most ``max_body_bytes`` of memory.

``build_api(server)`` makes the FastAPI app around anything that is an
:class:`ApiServer` (``serve.app.Replica`` is): the deployment builds it per
replica (``__serve_build_asgi_app__``), tests build it around a replica that
runs without Ray.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from detserve.runtime.images import ImageError
from detserve.serve import protocol
from detserve.serve.body_limit import CLOSE, too_large
from detserve.serve.protocol import DetserveError, error

log = logging.getLogger("ray.serve")

#: ImageError codes that are named otherwise in the HTTP contract (the rest keep theirs). An image over the
#: byte limit is the body limit seen from inside (both are ``max_body_bytes``), so it gets the body's code:
#: one code per limit; ``not_found`` (a path given to the handle) is not the 404 of a route.
IMAGE_CODE = {"too_large": "body_too_large", "not_found": "file_not_found"}

@dataclass
class RequestLimits:
    max_body_bytes: int = 50 * 1024 * 1024
    max_images: int = 64


class ClientGone(Exception):
    """The client closed the connection before its body was read: nobody reads the answer."""


def error_response(exc: DetserveError) -> JSONResponse:
    return JSONResponse(protocol.error_payload(exc.code, exc.message), status_code=exc.status, headers=exc.headers or None)


def image_error(exc: ImageError, index: int | None = None) -> DetserveError:
    where = f"image {index}: " if index is not None else ""
    return error(IMAGE_CODE.get(exc.code, exc.code), where + exc.message)


USAGE = (
    "send one image as the raw body (Content-Type: image/jpeg, image/png, ...), "
    "several as multipart/form-data files, or JSON {\"images\": [\"<base64>\", ...]}"
)


# ---- reading the body ----------------------------------------------------------


async def read_images(request: Request, limits: RequestLimits) -> list[bytes]:
    """The images in a request body, as bytes, in order; the limits hold while the bytes arrive."""
    # Starlette decodes headers as latin-1, so this round trip is exact for real requests.
    content_type, options = parse_options_header(request.headers.get("content-type", "").encode("latin-1", "replace"))
    content_type = content_type.decode("latin-1").strip().lower()
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        raise error(*too_large(limits.max_body_bytes, length=int(length)), headers=CLOSE)
    if content_type == "multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise error("bad_multipart", 'the Content-Type multipart/form-data has no boundary: let your HTTP client build the body (curl -F file=@img.jpg)')
        collector = _MultipartImages(boundary, limits.max_images)
        try:
            await _stream(request, limits.max_body_bytes, collector.write)
            images = collector.finish()
        except BaseException:
            collector.files = []  # what the parts held goes now, whoever keeps this frame (the error's traceback)
            raise
        finally:
            collector.close()
    else:
        # Grown chunk by chunk as it arrives, not joined at the end: one join of a 36 MiB body held
        # the event loop (and every other request on the replica) for about 90 ms here.
        body = bytearray()
        try:
            await _stream(request, limits.max_body_bytes, body.extend)
        except BaseException:
            body = None  # the error's traceback keeps this frame a while: not the upload it had read
            raise
        if not body:
            raise error("empty", f"the request body is empty: {USAGE}")
        if content_type == "application/json":
            images = await _json_images(body)
        elif content_type.startswith("image/") or content_type in ("application/octet-stream", ""):
            images = [bytes(body)]
        else:
            raise error("unsupported_media_type", f"Content-Type {content_type!r} is not accepted: {USAGE}")
    if not images:
        raise error("no_images", f"the request holds no images: {USAGE}")
    if len(images) > limits.max_images:
        raise error("too_many_images", f"{len(images)} images in one request; the limit is {limits.max_images}: split them over several requests")
    return images


async def _stream(request: Request, limit: int, sink) -> None:
    """Feed the body to ``sink`` chunk by chunk; 413 (and the connection closed) as soon as it passes ``limit`` bytes."""
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise error(*too_large(limit, received=size), headers=CLOSE)
            if chunk:
                sink(chunk)
    except ClientDisconnect:
        # The client went away, or the ingress's body limit cut the upload (serve/body_limit.py): either way the
        # caller drops what the sink holds.
        sink = None  # noqa: F841  (this frame lives on in the error's traceback; the body need not)
        _give_memory_back(size)
        raise ClientGone() from None
    except DetserveError:
        sink = None  # noqa: F841
        _give_memory_back(size)
        raise


#: Seconds after a large refused body before glibc is asked to give its memory back: by then the request's
#: frames have let go of the body (the handler answering the error still held it). A trim costs a few ms.
TRIM_AFTER_S = 0.25


def _give_memory_back(size: int) -> None:
    # glibc keeps the freed heap pages of a big refused body mapped (it trims only the top of its heaps
    # by itself); hand them back so the replica's RSS returns to its baseline (tests/test_serve.py).
    if size < 4 * 1024 * 1024:
        return
    try:
        asyncio.get_running_loop().call_later(TRIM_AFTER_S, _malloc_trim)
    except RuntimeError:  # no loop (a direct call): trim now
        _malloc_trim()


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _MultipartImages:
    """The file parts of a multipart/form-data body, parsed as its chunks arrive."""

    def __init__(self, boundary: bytes, max_images: int):
        self.max_images = max_images
        self.files: list[bytes] = []
        self.parts = 0
        self.ended = False
        self._part: list[bytes] | None = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self.parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._field, "on_header_value": self._value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_end": self._finished,
        })  # fmt: skip

    def close(self) -> None:
        """Drop the parser: its callbacks are bound methods of this object, a cycle that only the cyclic GC would
        free (and Serve freezes the GC at start), keeping a refused upload's parts in memory long after."""
        self.parser = None
        self._part = None

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError:
            raise error("bad_multipart", "the multipart body is malformed (bad boundary or part headers): let your HTTP client build it (curl -F file=@img.jpg)") from None

    def finish(self) -> list[bytes]:
        if not self.ended:
            raise error("bad_multipart", "the multipart body ends before its closing boundary: send the whole body")
        if not self.files:
            raise error("no_images", "the multipart body has no file parts: send images as files (curl -F file=@img.jpg)")
        return self.files

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_images:
            raise error("too_many_images", f"the multipart body has more than {self.max_images} parts; the limit is {self.max_images} images, one file part each: split them over several requests")
        self._headers, self._part = {}, None

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        # As Starlette does: a part with a filename is a file; other fields are ignored.
        self._part = [] if b"filename" in params else None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part is not None:
            self._part.append(data[start:end])

    def _end(self) -> None:
        if self._part is not None:
            self.files.append(b"".join(self._part))
        self._part = None

    def _finished(self) -> None:
        self.ended = True


async def _json_images(body: bytearray) -> list[bytes]:
    """The images of a JSON body; the event loop runs other requests between one image and the next.

    json.loads and base64 hold the GIL for the whole body: 150-350 ms for 64 photos of 9 MP on
    this 2-core machine, a stall that every other request on the replica waited out. A body of
    exactly the documented shape (``_image_strings``) skips json.loads and is decoded image by
    image, yielding between them. Anything else, or a string that is not strict base64, goes
    through ``_json_images_parsed``, so every body gets the same answer (images or error) either
    way (tests/test_fuzz.py checks that).
    """
    spans = _image_strings(body)
    if spans is None:
        return _json_images_parsed(body)
    view, out = memoryview(body), []
    for start, end in spans:
        if body.startswith(b"data:", start, end):  # data:image/png;base64,...: what follows the first comma
            comma = body.find(b",", start, min(end, start + 256))
            if comma < 0 or not all(0x20 <= c < 0x7F for c in view[start:comma]):
                return _json_images_parsed(body)  # no short printable prefix: json.loads decides
            start = comma + 1
        try:
            out.append(binascii.a2b_base64(view[start:end], strict_mode=True))  # = b64decode(validate=True)
        except binascii.Error:
            return _json_images_parsed(body)  # not base64, or not even a JSON string: the parser's own error
        await asyncio.sleep(0)
    return out


_JSON_SPACE = b" \t\n\r"


def _image_strings(body: bytearray) -> list[tuple[int, int]] | None:
    """Where the strings of ``{"images": ["...", ...]}`` lie in ``body`` (start, end), or None if it is not exactly that.

    Only a body without a backslash qualifies: then no string holds an escape, so each one ends
    at the next quote (bytes.find, memchr-fast) and its bytes are its text once they prove to be
    base64. JSON whitespace is allowed between tokens; another key, a duplicate key, a trailing
    comma or anything after the closing brace does not qualify.
    """
    if b"\\" in body:
        return None
    n = len(body)

    def token(i: int, text: bytes) -> int:
        while i < n and body[i] in _JSON_SPACE:
            i += 1
        return i + len(text) if body.startswith(text, i) else -1

    i = 0
    for text in (b"{", b'"images"', b":", b"["):
        if (i := token(i, text)) < 0:
            return None
    spans: list[tuple[int, int]] = []
    if (after := token(i, b"]")) >= 0:
        i = after
    else:
        while True:
            if (i := token(i, b'"')) < 0 or (end := body.find(b'"', i)) < 0:
                return None
            spans.append((i, end))
            if (after := token(end + 1, b",")) >= 0:
                i = after
            elif (i := token(end + 1, b"]")) >= 0:
                break
            else:
                return None
    if (i := token(i, b"}")) < 0 or token(i, b"") != n:
        return None
    return spans


def _json_images_parsed(body: bytes | bytearray) -> list[bytes]:
    """The images of a JSON body, through json.loads: any JSON, and the error for every mistake."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise error("bad_json", f"the body is not valid JSON{where}: send {{\"images\": [\"<base64>\", ...]}}") from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise error("bad_json_shape", 'JSON bodies must be {"images": ["<base64>", ...]}: a list of base64 strings (data: URLs work too)')
    out = []
    for i, text in enumerate(images):
        if text.startswith("data:"):  # data URLs: data:image/png;base64,....
            text = text.partition(",")[2]
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise error("bad_base64", f"images[{i}] is not valid base64: send each image's bytes base64-encoded (standard alphabet, with padding)") from None
    return out


# ---- query parameters ----------------------------------------------------------

PREDICT_PARAMETERS = {
    "conf": "a number from 0 to 1 (score threshold), e.g. conf=0.25",
    "iou": "a number from 0 to 1 (NMS IoU threshold), e.g. iou=0.45",
    "max_det": "a whole number from 1 to 10000 (detections per image), e.g. max_det=100",
}


async def check_query(request: Request) -> None:
    """Unknown and repeated query parameters are mistakes (a typo'd ``conf`` would be silently ignored).

    ``async``, so FastAPI runs it on the event loop: a plain ``def`` dependency goes through anyio's worker
    threads, and each such call scans every task of the loop (anyio's ``find_root_task``). With 700 requests
    queued (2x overload, 30 s deadline) that scan was a fifth of the replica's Python time.
    """
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = sorted(set(names) - set(PREDICT_PARAMETERS))
    if unknown:
        raise error("unknown_parameter", f"unknown query parameter(s) {', '.join(unknown)}: /predict takes {', '.join(PREDICT_PARAMETERS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise error("repeated_parameter", f"query parameter(s) {', '.join(repeated)} given more than once: give each at most once")


def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for e in exc.errors():
        where, name = (e["loc"][0], e["loc"][-1]) if e["loc"] else ("request", "?")
        value = e.get("input")
        if where == "query" and name in PREDICT_PARAMETERS:
            shown = value if isinstance(value, str) else json.dumps(value)
            reason = "is not a finite number" if e["type"] == "finite_number" or str(value).strip().lower() in ("nan", "inf", "-inf", "infinity") else e["msg"].lower()
            problems.append(f"{name}={shown}: {reason}; send {PREDICT_PARAMETERS[name]}")
        else:
            problems.append(f"{where} {name}: {e['msg']}")
    return "; ".join(problems)


# ---- the OpenAPI description ------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, one per cause (docs/http-api.md lists them all)")
    message: str = Field(description="what was sent and what to send instead")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Point(BaseModel):
    model_config = ConfigDict(extra="allow")
    x: float
    y: float
    z: float | None = 0


class BoxAnnotation(BaseModel):
    """A Dataloop box annotation (``dl.Box`` as ``AnnotationCollection.to_json()`` writes it)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["box"]
    label: str
    coordinates: list[Point] = Field(description="[top-left, bottom-right] in pixels of the original image", min_length=2, max_length=2)
    metadata: dict[str, Any] = Field(description="metadata.user.model = {name, confidence, model_id}")


class ImageResult(BaseModel):
    width: int
    height: int
    frames: int = Field(1, description="frames in the file (animated GIF, multi-page TIFF); boxes are for the first")
    annotations: list[BoxAnnotation]


class ModelSummary(BaseModel):
    name: str
    version: str
    backend: str
    device: str
    precision: str = Field(description="fp32, fp16 or int8: the precision of the artifact that answered")
    variant: str = Field(description="which of the export's variants answered: fp32 (the exact export), int8-cpu, ... (docs/precision.md)")


class PredictResponse(BaseModel):
    model: ModelSummary
    results: list[ImageResult] = Field(description="one per image, in request order")


class ImagesJson(BaseModel):
    images: list[str] = Field(description="base64-encoded image files (or data: URLs)", min_length=1)


def _errors_doc(*statuses: int) -> dict[int | str, dict]:
    """The error responses of a route, each status with every registered code of it (serve/protocol.py)."""
    by_status = protocol.codes_by_status()
    return {
        status: {"model": ErrorBody, "description": "; ".join(f"`{e.code}`: {e.meaning}" for e in by_status[status])}
        for status in statuses
    }


#: Every route can answer these: an unknown path under the application's prefix, a method the route does not take.
ROUTING_ERRORS = (404, 405)


PREDICT_BODIES = {
    "requestBody": {
        "required": True,
        "description": f"The images: {USAGE}.",
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["file"],
                },
                "encoding": {"file": {"contentType": "image/*"}},
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/ImagesJson"}},
        },
    }
}


# ---- the app -------------------------------------------------------------------

SWAGGER_ASSETS = "docs-assets"


def _swagger_ui_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(swagger_ui_path)


class ApiServer(Protocol):
    """What ``build_api`` needs of the server it wraps (``serve.app.Replica``)."""

    request_limits: RequestLimits

    def params(self, conf: float | None, iou: float | None, max_det: int | None) -> Any:
        """One request's settings from its query parameters."""

    def request_deadline(self, request: Request) -> tuple[float, float]:
        """(deadline on the event loop's clock, the whole budget in seconds) of an HTTP request; raises the 422 of a
        deadline header that cannot be used."""

    async def detect(self, images: list[bytes], params: Any, deadline: float, budget_s: float | None = None) -> dict:
        """The answer body for the images, or a ``DetserveError``."""

    def admission_header(self) -> dict[str, str]:
        """This replica's outlook as it answers, for the admission in front of it."""

    async def stats(self) -> dict:
        """What /stats shows."""

    async def http_info(self) -> dict:
        """What /info shows."""


def build_api(server: ApiServer) -> FastAPI:
    """The FastAPI app of one replica, around ``server`` (a ``serve.app.Replica``, or a stand-in in tests)."""
    api = FastAPI(
        title="detserve",
        description=(
            "Object detection with dynamic batching. POST images to /predict; boxes come back as Dataloop "
            'annotations. Every error is {"error": {"code", "message"}}.'
        ),
        version="0.1.0",
        docs_url=None,  # served below from the packaged Swagger UI: no CDN
        redoc_url=None,
    )

    @api.exception_handler(DetserveError)
    async def _api_error(request: Request, exc: DetserveError):
        return error_response(exc)

    @api.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        log.info("detserve: the client closed the connection while sending its body; request dropped")
        return error_response(error("client_disconnected", "the connection closed before the whole body arrived"))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(error("invalid_parameter", _validation_message(exc)))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path
        if exc.status_code == 404:
            return error_response(error("not_found", f"no route {path}: this application serves POST predict, GET info, GET stats, GET docs under its prefix", exc.headers))
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return error_response(error("method_not_allowed", f"{request.method} is not allowed on {path}; use {allowed or 'another method'}", exc.headers))
        return error_response(error(f"http_{exc.status_code}", str(exc.detail), exc.headers, status=exc.status_code))

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("detserve: unexpected error")
        return error_response(error("internal", f"the server failed on this request ({type(exc).__name__}); it keeps serving: retry, and report it if it repeats"))

    @api.post(
        "/predict",
        summary="Detect objects in one or more images",
        response_model=PredictResponse,
        responses=_errors_doc(400, *ROUTING_ERRORS, 408, 413, 415, 422, 500, 503),
        openapi_extra=PREDICT_BODIES,
        dependencies=[Depends(check_query)],
    )
    async def predict(
        request: Request,
        conf: float | None = Query(None, ge=0.0, le=1.0, allow_inf_nan=False, description="score threshold"),
        iou: float | None = Query(None, ge=0.0, le=1.0, allow_inf_nan=False, description="NMS IoU threshold"),
        max_det: int | None = Query(None, ge=1, le=10000, description="detections per image"),
    ) -> JSONResponse:
        deadline = server.request_deadline(request)  # a deadline header that is not used is refused before the body is read
        images = await read_images(request, server.request_limits)

        try:
            params = server.params(conf, iou, max_det)
            # A Response, so FastAPI does not validate and re-serialise the body through
            # PredictResponse (1.5 ms per 20-box image); the model stays for the OpenAPI spec,
            # and tests/test_fuzz.py checks that the answers keep to it.
            body = await server.detect(images, params, *deadline)
        except DetserveError as exc:
            exc.headers = {**(exc.headers or {}), **server.admission_header()}
            raise
        except asyncio.CancelledError:
            # Ray cancels the handler when the client disconnects; images not
            # yet decoded or batched are dropped with it (see README, "Serve").
            log.info("detserve: the client went away; its %d image(s) were dropped", len(images))
            raise
        return JSONResponse(body, headers=server.admission_header())

    @api.get("/stats", summary="Batch sizes this replica has formed", responses=_errors_doc(*ROUTING_ERRORS, 500))
    async def stats() -> dict:
        return await server.stats()

    @api.get("/info", summary="The model this application serves", responses=_errors_doc(*ROUTING_ERRORS, 500))
    async def info() -> dict:
        return await server.http_info()

    api.mount(f"/{SWAGGER_ASSETS}", StaticFiles(directory=_swagger_ui_dir()), name="swagger-assets")

    @api.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{api.openapi_url}",
            title="detserve - API",
            swagger_js_url=f"{root}/{SWAGGER_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/{SWAGGER_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}/{SWAGGER_ASSETS}/favicon-32x32.png",
        )

    return api
