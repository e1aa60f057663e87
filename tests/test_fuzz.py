"""Fuzzing: schemathesis against the app's own OpenAPI spec, hypothesis over the decoder and the
request parser with random and mutated image bytes.

Bounded for `make test` (a few dozen examples each, seconds); `make fuzz` runs the same tests
with DETSERVE_FUZZ_EXAMPLES=2000.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import os

import cv2
import numpy as np
import pytest
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

from detserve.runtime import images as imagelib
from detserve.runtime.images import ImageError, Limits, decode, frame_count
from detserve.serve.protocol import DetserveError
from detserve.serve.http import RequestLimits, _json_images, _json_images_parsed, read_images

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


# ---- the JPEG fast path against Pillow -------------------------------------------------


def _jpeg_seeds() -> list[bytes]:
    """Small JPEGs of every layout the OpenCV path takes: 4:2:0, 4:4:4, progressive, optimized, gray,
    restart markers, an EXIF orientation."""
    from tests.test_images import _jpeg, photo_like

    photo = photo_like(40, 56)
    restart = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])[1].tobytes()
    return [_jpeg(photo), _jpeg(photo, subsampling=0), _jpeg(photo, progressive=True), _jpeg(photo, optimize=True),
            _jpeg(photo, mode="L"), _jpeg(photo, 6), restart]  # fmt: skip


JPEG_SEEDS = _jpeg_seeds()
JPEG_DAMAGE = ["flip", "flips", "cut", "cut_to_eoi", "marker", "block", "huffman", "quantization", "frame"]


def _segment(data: bytearray, marker: int) -> int:
    """Where the first ``FF marker`` segment starts (the SOS when there is none)."""
    at = data.find(bytes([0xFF, marker]))
    return at if at >= 0 else data.find(b"\xff\xda")


def damaged_jpeg(data: bytearray, kind: str, pick) -> bytes:
    """``data`` with one kind of damage; ``pick(lo, hi)`` chooses an integer in [lo, hi] (hypothesis or random)."""
    scan = data.find(b"\xff\xda") + 14  # past a 3-component SOS header: into the entropy-coded data
    in_scan = lambda: pick(scan, len(data) - 3)  # noqa: E731
    if kind == "flip":
        data[in_scan()] ^= 1 << pick(0, 7)
    elif kind == "flips":
        for _ in range(pick(2, 12)):
            data[in_scan()] = pick(0, 255)
    elif kind in ("cut", "cut_to_eoi"):
        del data[in_scan() :]
        data += b"\xff\xd9" if kind == "cut_to_eoi" else b""
    elif kind == "marker":  # a marker inside the scan: unknown, SOI, EOI, SOS, DHT, DQT, RSTn, SOF, APP1
        at = in_scan()
        data[at : at + 2] = bytes([0xFF, [pick(1, 255), 0xD8, 0xD9, 0xDA, 0xC4, 0xDB, 0xD0 + pick(0, 7), 0xC0, 0xE1][pick(0, 8)]])
    elif kind == "block":  # random bytes over part of the scan
        at = in_scan()
        data[at : at + 64] = bytes(pick(0, 255) for _ in range(64))
    else:  # a byte of the first Huffman table, quantization table or frame header
        at = _segment(data, {"huffman": 0xC4, "quantization": 0xDB, "frame": 0xC0}[kind])
        data[pick(at + 2, min(at + 40, len(data) - 1))] = pick(0, 255)
    return bytes(data)


@st.composite
def damaged_jpegs(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(JPEG_SEEDS)))
    return damaged_jpeg(data, draw(st.sampled_from(JPEG_DAMAGE)), lambda lo, hi: draw(st.integers(lo, max(lo, hi))))


def _pillow_alone(data: bytes) -> np.ndarray | None:
    """What Pillow alone makes of ``data``: its pixels, or None when it refuses the file."""
    from tests.test_images import pillow_pixels

    try:
        return pillow_pixels(data)
    except Exception:  # noqa: BLE001  (any refusal of Pillow's counts as a refusal)
        return None


def opencv_and_pillow_agree(data: bytes) -> str:
    """Check one file: the OpenCV path, when it answers, gives Pillow's pixels, and decode accepts and refuses what
    Pillow does. Returns which path decoded it ("opencv", "pillow") or "refused"."""
    expected = _pillow_alone(data)
    try:
        header = Image.open(io.BytesIO(data))
        fast = imagelib._jpeg_without_gil(data, header)
    except Exception:  # noqa: BLE001  (no header: decode refuses it below, as Pillow does)
        fast = None
    if fast is not None:
        assert expected is not None, "the OpenCV path accepted a JPEG that Pillow refuses"
        np.testing.assert_array_equal(fast, expected)
    try:
        got = decode(data)
    except ImageError as exc:
        assert expected is None, f"decode refused ({exc.code}) a JPEG that Pillow accepts"
        return "refused"
    assert expected is not None, "decode accepted a JPEG that Pillow refuses"
    np.testing.assert_array_equal(got, expected)
    return "opencv" if fast is not None else "pillow"


@FUZZ
@given(damaged_jpegs())
def test_the_opencv_jpeg_path_accepts_what_pillow_accepts_with_pillows_pixels(data):
    opencv_and_pillow_agree(data)


def test_a_sweep_of_damaged_jpegs_is_decided_as_pillow_decides_it():
    # The fixed-seed companion of the property above: every kind of damage on every seed, enough times that
    # each outcome occurs (a check that only ever saw one path would prove nothing).
    import random

    rng = random.Random(25)
    outcomes = collections.Counter()
    for round_ in range(12):
        for seed in JPEG_SEEDS:
            for kind in JPEG_DAMAGE:
                data = damaged_jpeg(bytearray(seed), kind, rng.randint)
                outcomes[kind, opencv_and_pillow_agree(data)] += 1
    assert outcomes["marker", "refused"] > 20, outcomes  # stray markers: what OpenCV used to accept
    assert outcomes["flip", "opencv"] > 20 and outcomes["cut_to_eoi", "opencv"] > 20, outcomes  # still the fast path
    assert sum(n for (_, path), n in outcomes.items() if path == "pillow") > 0, outcomes


def test_random_bytes_over_a_photos_scan_are_refused_as_pillow_refuses_them():
    # What a user sent: a JPEG with 4096 random bytes written over the middle of its scan data. OpenCV returned
    # a 1080x810 image of garbage (and libjpeg printed "Corrupt JPEG data"); Pillow refuses it.
    from tests.test_images import _jpeg, photo_like

    data = bytearray(_jpeg(photo_like(810, 1080)))
    middle = (data.find(b"\xff\xda") + len(data)) // 2
    data[middle : middle + 4096] = np.random.default_rng(9).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert _pillow_alone(bytes(data)) is None
    with pytest.raises(ImageError) as err:
        decode(bytes(data))
    assert err.value.code == "corrupt_image"


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
    except DetserveError as exc:
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
    except DetserveError as exc:
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
