"""HTTP request parsing and error bodies for ``POST /<app>/predict``.

Every error a client can cause becomes ``{"error": {"code", "message"}}`` with
a 4xx status; the message says what was wrong and what to send instead.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from detserve.runtime.images import ImageError

#: ImageError codes -> HTTP status
IMAGE_STATUS = {"too_large": 413, "too_many_pixels": 413, "unsupported_type": 415}


@dataclass
class RequestLimits:
    max_body_bytes: int = 50 * 1024 * 1024
    max_images: int = 64


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers)


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def image_error(exc: ImageError, index: int | None = None) -> ApiError:
    where = f"image {index}: " if index is not None else ""
    return ApiError(IMAGE_STATUS.get(exc.code, 400), exc.code, where + exc.message)


USAGE = (
    "send one image as the raw body (Content-Type: image/jpeg, image/png, ...), "
    "several as multipart/form-data files, or JSON {\"images\": [\"<base64>\", ...]}"
)


async def read_images(request: Request, limits: RequestLimits) -> list[bytes]:
    """The images in a request body, as bytes, in order."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        raise ApiError(413, "body_too_large", f"the body is {length} bytes; the limit is {limits.max_body_bytes}")
    if content_type == "multipart/form-data":
        images = await _multipart(request)
    else:
        body = await _body(request, limits.max_body_bytes)
        if not body:
            raise ApiError(400, "empty", f"the request body is empty: {USAGE}")
        if content_type == "application/json":
            images = _json_images(body)
        elif content_type.startswith("image/") or content_type in ("application/octet-stream", ""):
            images = [body]
        else:
            raise ApiError(415, "unsupported_media_type", f"Content-Type {content_type!r} is not accepted: {USAGE}")
    if not images:
        raise ApiError(400, "no_images", f"the request holds no images: {USAGE}")
    if len(images) > limits.max_images:
        raise ApiError(413, "too_many_images", f"{len(images)} images in one request; the limit is {limits.max_images}")
    return images


async def _body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart(request: Request) -> list[bytes]:
    try:
        form = await request.form(max_files=1000, max_fields=1000)
    except Exception as exc:  # malformed multipart bodies raise several kinds
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed: {exc}") from None
    files = []
    for _, value in form.multi_items():
        if hasattr(value, "read"):
            files.append(await value.read())
    await form.close()
    if not files:
        raise ApiError(400, "no_images", "the multipart body has no file parts: send images as files (curl -F file=@img.jpg)")
    return files


def _json_images(body: bytes) -> list[bytes]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise ApiError(422, "bad_json", 'JSON bodies must be {"images": ["<base64>", ...]}')
    out = []
    for i, text in enumerate(images):
        if text.startswith("data:"):  # data URLs: data:image/png;base64,....
            text = text.partition(",")[2]
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(400, "bad_base64", f"images[{i}] is not valid base64") from None
    return out
