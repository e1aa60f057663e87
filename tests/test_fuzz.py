"""Fuzzing: schemathesis against the app's own OpenAPI spec, hypothesis over the decoder and the
request parser with random and mutated image bytes.

Bounded for `make test` (a few dozen examples each, seconds); `make fuzz` runs the same tests
with DETSERVE_FUZZ_EXAMPLES=2000.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os

import numpy as np
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from detserve.runtime.images import ImageError, Limits, decode, frame_count
from detserve.serve.http import ApiError, RequestLimits, _json_images, _json_images_parsed, read_images

EXAMPLES = int(os.environ.get("DETSERVE_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _seeds() -> list[bytes]:
    """One small valid file per format decode reads, to mutate."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    out = []
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 80}), ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {}),
                    ("PNG", {"optimize": True}), ("TIFF", {"compression": "tiff_lzw"})):  # fmt: skip
        buf = io.BytesIO()
        (image.convert("P") if fmt == "GIF" else image).save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 32))]
        else:  # the header of one format on the body of another
            other = draw(st.sampled_from(SEEDS))
            data = data[:pos] + bytearray(other[pos:])
    return bytes(data)


image_bytes = st.one_of(st.binary(max_size=256), mutated_images())


@FUZZ
@given(image_bytes)
def test_decode_raises_only_image_error(data):
    try:
        array = decode(data, Limits(max_pixels=4_000_000, max_bytes=1 << 20))
    except ImageError as exc:
        assert exc.code and exc.message
    else:
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert frame_count(data) >= 1


# ---- the request parser --------------------------------------------------------------


class _Request:
    """What read_images uses of a Starlette request: headers and the body stream."""

    def __init__(self, content_type: str, body: bytes, chunk: int):
        self.headers = {"content-type": content_type}
        self._parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]

    async def stream(self):
        for part in self._parts:
            yield part


def _multipart(files: list[bytes], boundary: str) -> bytes:
    out = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n\r\n'.encode() + f + b"\r\n"
        for i, f in enumerate(files)
    )
    return out + f"--{boundary}--\r\n".encode()


@st.composite
def request_bodies(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["raw", "json", "multipart", "random"]))
    images = draw(st.lists(image_bytes, min_size=0, max_size=3))
    if kind == "raw":
        ctype, body = draw(st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", ""])), images[0] if images else b""
    elif kind == "json":
        ctype = "application/json"
        body = draw(st.sampled_from([
            lambda: ('{"images": [%s]}' % ",".join(f'"{base64.b64encode(i).decode()}"' for i in images)).encode(),
            lambda: draw(st.binary(max_size=64)),
            lambda: draw(st.text(max_size=64)).encode(),
            lambda: b'{"images": [1, null]}',
            lambda: b"[" * 5000,
        ]))()  # fmt: skip
    elif kind == "multipart":
        boundary = draw(st.sampled_from(["b", "----x123", "a" * 70]))
        ctype = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data", "multipart/form-data; boundary="]))
        body = _multipart(images, boundary)
        if draw(st.booleans()):  # mutate the framing too
            pos = draw(st.integers(0, max(0, len(body) - 1)))
            body = body[:pos] + draw(st.binary(max_size=16)) + body[pos + draw(st.integers(0, 16)) :]
    else:
        ctype, body = draw(st.text(max_size=40)), draw(st.binary(max_size=256))
    return ctype, body


@FUZZ
@given(request_bodies(), st.integers(1, 4096))
def test_the_request_parser_raises_only_api_error(request_body, chunk):
    ctype, body = request_body
    limits = RequestLimits(max_body_bytes=64 * 1024, max_images=4)
    try:
        images = asyncio.run(read_images(_Request(ctype, body, chunk), limits))
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.code and exc.message
    else:
        assert 1 <= len(images) <= limits.max_images and all(isinstance(i, bytes) for i in images)


@st.composite
def json_bodies(draw) -> bytes:
    """Bodies near the documented JSON shape: spacing, data: URLs, odd strings, then maybe a few bytes changed."""
    space = st.sampled_from(["", " ", "\n", "\t ", "\r\n", "\x0b", "\u00a0"])
    texts = st.one_of(
        st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()),
        st.binary(max_size=48).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
        st.sampled_from(["", "data:", "data:,", "QUJD=", "QU JD", "QUJD\\n", "\u00e9", "QU\x01JD", "data:\x01,QUJD", "=QUJD"]),
        st.text(max_size=12),
    )
    items = draw(st.lists(texts, max_size=4))
    sep = draw(space)
    key = draw(st.sampled_from(['"images"', '"images"', '"images"', '"Images"', '"\\u0069mages"']))
    extra = draw(st.sampled_from(["", "", ', "x": 1', ', "images": []', ","]))
    inner = ("," + sep).join(f'"{t}"' for t in items)
    body = f"{sep}{{{sep}{key}{sep}:{sep}[{sep}{inner}{sep}]{extra}{sep}}}{draw(space)}".encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        pos = draw(st.integers(0, max(0, len(body) - 1)))
        body = body[:pos] + draw(st.binary(max_size=3)) + body[pos + draw(st.integers(0, 3)) :]
    return body


def _outcome(parse, body: bytes):
    try:
        result = parse(body)
        return asyncio.run(result) if asyncio.iscoroutine(result) else result
    except ApiError as exc:
        return (exc.status, exc.code, exc.message)


@FUZZ
@given(json_bodies())
def test_the_json_fast_path_answers_every_body_as_json_loads_does(body):
    # _json_images skips json.loads for bodies of the documented shape (so one large request does
    # not stall the event loop); for every body it must give the same images, or the same error.
    assert _outcome(_json_images, bytearray(body)) == _outcome(_json_images_parsed, body)


def test_the_json_fast_path_takes_the_documented_shape():
    images = [b"\x89PNG..", b"\xff\xd8\xff"]
    body = ('{ "images" : [ "%s",\n"data:image/jpeg;base64,%s" ] }' % tuple(base64.b64encode(i).decode() for i in images)).encode()
    from detserve.serve.http import _image_strings

    assert _image_strings(bytearray(body)) is not None  # the fast path, not the fallback
    assert asyncio.run(_json_images(bytearray(body))) == images
    assert _image_strings(bytearray(b'{"images": ["QUJD"], "images": []}')) is None


# ---- schemathesis: the app against its own spec -----------------------------------------


#: No 500, and every response (status, content type, headers, body) as the spec says. Not
#: positive_data_acceptance: random bytes are valid `image/*` per the spec but no image.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]  # fmt: skip


def test_the_app_keeps_to_its_own_openapi_spec(local_client):
    # Each operation's strategy driven by hypothesis here: schemathesis' pytest fixture loader
    # (schemathesis.pytest.from_fixture) fails under pytest 9 (it reads Function._nodeid).
    schema = schemathesis.openapi.from_asgi("/openapi.json", local_client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("POST", "/predict"), ("GET", "/info"), ("GET", "/stats")}
    for operation in operations:

        @FUZZ
        @given(case=operation.as_strategy())
        def check(case):
            case.call_and_validate(checks=CHECKS)

        check()
