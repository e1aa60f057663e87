"""The HTTP contract of /predict, in process (no Ray): one JSON error body per cause, limits while
streaming, disconnects, multi-frame images, the OpenAPI description and the offline /docs.

``local_client`` (conftest) is the replica's real FastAPI app around the real server class, with
``max_body_bytes`` = 2 MiB and ``max_images`` = 4 so the limits are cheap to reach.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re

import pytest
from PIL import Image, PngImagePlugin

LIMIT = 2 * 1024 * 1024


def png(width=64, height=48, color="white") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def multipart(parts: list[tuple[str, str | None, bytes]], boundary="detservetest") -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/png\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MP = {"content-type": "multipart/form-data; boundary=detservetest"}
PNG_CT = {"content-type": "image/png"}


def chunks(total: int, size: int = 256 * 1024):
    sent = 0
    while sent < total:
        yield b"\0" * min(size, total - sent)
        sent += size


#: (what is sent, status, code): one per cause. Messages are checked for leaked internals below.
CASES = {
    "empty body": (dict(content=b"", headers=PNG_CT), 400, "empty"),
    "not an image": (dict(content=b"hello", headers=PNG_CT), 400, "not_an_image"),
    "truncated png": (dict(content=png(300, 200, "red")[:120], headers=PNG_CT), 400, "corrupt_image"),
    "text/plain": (dict(content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    "json not json": (dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "bad_json"),
    "json wrong shape": (dict(json={"images": "x"}), 422, "bad_json_shape"),
    "json bad base64": (dict(json={"images": ["!!"]}), 400, "bad_base64"),
    "json too many": (dict(json={"images": [base64.b64encode(png()).decode()] * 5}), 413, "too_many_images"),
    "multipart no boundary": (dict(content=b"x", headers={"content-type": "multipart/form-data"}), 400, "bad_multipart"),
    "multipart cut off": (dict(content=multipart([("f", "a.png", png())])[:-20], headers=MP), 400, "bad_multipart"),
    "multipart garbage": (dict(content=b"--other\r\n\r\nzz", headers=MP), 400, "bad_multipart"),
    "multipart no files": (dict(content=multipart([("note", None, b"hi")]), headers=MP), 400, "no_images"),
    "multipart too many parts": (dict(content=multipart([("f", f"{i}.png", png()) for i in range(50)]), headers=MP), 413, "too_many_images"),
    "raw over limit (content-length)": (dict(content=b"\0" * (LIMIT + 1), headers=PNG_CT), 413, "body_too_large"),
    "raw over limit (chunked)": (dict(content=chunks(LIMIT + 1), headers=PNG_CT), 413, "body_too_large"),
    "multipart over limit (chunked)": (
        dict(content=iter([multipart([("f", "a.png", b"\0" * (LIMIT + 10))])]), headers=MP), 413, "body_too_large"),
    "too many pixels": (dict(content=None, headers=PNG_CT), 413, "too_many_pixels"),
    "conf=nan": (dict(content=png(), headers=PNG_CT, params={"conf": "nan"}), 422, "invalid_parameter"),
    "conf=inf": (dict(content=png(), headers=PNG_CT, params={"conf": "inf"}), 422, "invalid_parameter"),
    "conf=2": (dict(content=png(), headers=PNG_CT, params={"conf": "2"}), 422, "invalid_parameter"),
    "max_det=abc": (dict(content=png(), headers=PNG_CT, params={"max_det": "abc"}), 422, "invalid_parameter"),
    "unknown parameter": (dict(content=png(), headers=PNG_CT, params={"confidence": "0.5"}), 422, "unknown_parameter"),
    "conf twice": (dict(content=png(), headers=PNG_CT, params=[("conf", "0.1"), ("conf", "0.2")]), 422, "repeated_parameter"),
}  # fmt: skip

INTERNALS = re.compile(r"PIL|Pillow\b.*Plugin|Starlette|starlette|python.multipart|Traceback|400: |MAX_TEXT_CHUNK|pydantic", re.I)


@pytest.mark.parametrize("case", list(CASES))
def test_every_client_error_has_one_stable_code_and_a_plain_message(local_client, case):
    kwargs, status, code = CASES[case]
    if case == "too many pixels":  # 9000 x 9000 = 81 MP > 40 MP; a small PNG, refused from its header
        buf = io.BytesIO()
        Image.new("L", (9000, 9000)).save(buf, format="PNG")
        kwargs = dict(kwargs, content=buf.getvalue())
    r = local_client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"code", "message"}
    assert error["code"] == code, error
    assert error["message"] and not INTERNALS.search(error["message"]), error["message"]
    if code in ("invalid_parameter", "unknown_parameter", "repeated_parameter"):
        name = "confidence" if code == "unknown_parameter" else ("max_det" if "max_det" in case else "conf")
        assert name in error["message"]
    if case.startswith("conf=nan"):
        assert "not a finite number" in error["message"]


def test_404_and_405_inside_the_app_are_in_the_contract(local_client):
    r = local_client.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = local_client.get("/predict")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.json()["error"]["message"] and r.headers["allow"] == "POST"


def test_the_three_request_bodies_give_the_same_boxes(local_client):
    image = png(96, 64, "gray")
    raw = local_client.post("/predict", content=image, headers=PNG_CT).json()
    form = local_client.post("/predict", files=[("file", ("a.png", image, "image/png"))]).json()
    as_json = local_client.post("/predict", json={"images": [base64.b64encode(image).decode()]}).json()
    assert raw == form == as_json
    assert raw["results"][0]["width"] == 96 and raw["results"][0]["frames"] == 1


def test_a_png_with_a_large_text_chunk_decodes_and_a_huge_one_gets_a_clear_413(local_client):
    def with_text(size: int) -> bytes:
        info = PngImagePlugin.PngInfo()
        info.add_text("comment", "x" * size, zip=True)  # zTXt: tiny on the wire, big once inflated
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), "red").save(buf, "PNG", pnginfo=info)
        return buf.getvalue()

    r = local_client.post("/predict", content=with_text(2 * 1024 * 1024), headers=PNG_CT)
    assert r.status_code == 200, r.text  # over Pillow's default 1 MiB per text chunk: still fine
    r = local_client.post("/predict", content=with_text(17 * 1024 * 1024), headers=PNG_CT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "metadata_too_large", r.text
    assert "strip" in r.json()["error"]["message"]


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_images_give_the_first_frame_and_say_how_many_frames(local_client, fmt):
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    r = local_client.post("/predict", content=buf.getvalue(), headers={"content-type": f"image/{fmt.lower()}"})
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    assert (result["width"], result["height"], result["frames"]) == (40, 30, 3)
    from detserve.runtime.images import decode

    assert tuple(decode(buf.getvalue())[0, 0]) == (255, 0, 0)  # the first frame's pixels


# ---- straight ASGI calls: what the app pulls from the connection, and disconnects --------------


def _scope(path="/predict", headers=(("content-type", "image/png"),), query=b"") -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query,
        "headers": [(k.encode(), v.encode()) for k, v in headers], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip


async def _call(app, scope, messages):
    sent, pulled = [], 0

    async def receive():
        nonlocal pulled
        if pulled < len(messages):
            pulled += 1
            return messages[pulled - 1]
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent, pulled


@pytest.mark.parametrize("kind", ["raw", "multipart"])
def test_the_body_limit_stops_reading_a_chunked_upload_as_it_arrives(local_client, kind):
    """A 40 MiB chunked body against a 2 MiB limit: the app stops pulling chunks just past 2 MiB."""
    chunk = 64 * 1024
    n = 40 * 1024 * 1024 // chunk
    head = b"" if kind == "raw" else b'--b\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\n'
    messages = [{"type": "http.request", "body": head + b"\0" * chunk, "more_body": True}]
    messages += [{"type": "http.request", "body": b"\0" * chunk, "more_body": True} for _ in range(n)]
    ctype = "image/png" if kind == "raw" else "multipart/form-data; boundary=b"
    sent, pulled = asyncio.run(_call(local_client.app, _scope(headers=[("content-type", ctype), ("transfer-encoding", "chunked")]), messages))
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["code"] == "body_too_large"
    assert pulled <= LIMIT // chunk + 2, pulled  # never more than the limit (+ one chunk) was read
    # The message says what had arrived when the body was cut, not "over N bytes; the limit is N"; the connection closes.
    message = json.loads(sent[1]["body"])["error"]["message"]
    assert f"the limit of {LIMIT} bytes: {(pulled) * chunk + len(head)} bytes had arrived" in message, message
    assert dict(sent[0]["headers"])[b"connection"] == b"close"


# ---- the client's deadline header (serve/protocol.py client_timeout_s, serve/client_deadline.py) ----------------

UNUSABLE_DEADLINES = ["0", "-1", "abc", "nan", "inf", "1e9", "31", "1e1"]


@pytest.mark.parametrize("sent", UNUSABLE_DEADLINES)
def test_an_unusable_deadline_header_is_refused_by_the_app_before_the_body_is_read(local_client, sent):
    messages = [{"type": "http.request", "body": png(), "more_body": True}]  # never completed: it must not be read
    scope = _scope(headers=[("content-type", "image/png"), ("x-request-timeout-seconds", sent)])
    out, pulled = asyncio.run(_call(local_client.app, scope, messages))
    error = json.loads(out[1]["body"])["error"]
    assert out[0]["status"] == 422 and error["code"] == "invalid_deadline" and pulled == 0
    assert error["message"].startswith(f"x-request-timeout-seconds: {sent} ") and "at most 30" in error["message"]


@pytest.mark.parametrize("sent", UNUSABLE_DEADLINES)
def test_an_unusable_deadline_header_is_refused_at_the_ingress_before_admission_and_ray(sent):
    from detserve.serve.client_deadline import ClientDeadline

    called = []

    async def app(scope, receive, send):
        called.append(scope["path"])

    scope = _scope("/yolo/predict", headers=[("content-type", "image/png"), ("x-request-timeout-seconds", sent)])
    out, pulled = asyncio.run(_call(ClientDeadline(app, {"/yolo": 30.0}), scope, []))
    assert not called and pulled == 0 and out[0]["status"] == 422
    assert json.loads(out[1]["body"])["error"]["code"] == "invalid_deadline"


def test_a_deadline_the_margin_eats_is_refused_at_once_in_the_clients_numbers(local_client):
    from detserve.serve.client_deadline import ClientDeadline

    for sent in ("0.001", "0.3", "0.5"):
        headers = {"content-type": "image/png", "x-request-timeout-seconds": sent}
        r = local_client.post("/predict", content=png(), headers=headers)
        assert r.status_code == 422 and r.json()["error"]["code"] == "deadline_too_short", r.text
        message = r.json()["error"]["message"]
        assert f"x-request-timeout-seconds: {sent} leaves no time" in message and "0.00 s away" not in message
        out, _ = asyncio.run(_call(ClientDeadline(lambda *a: None), _scope(headers=list(headers.items())), []))
        assert out[0]["status"] == 422 and json.loads(out[1]["body"])["error"]["message"] == message  # the ingress says the same
    passed = []

    async def app(scope, receive, send):
        passed.append(scope["path"])

    for sent in ("0.6", "2", "30"):  # usable: on to the app
        asyncio.run(_call(ClientDeadline(app), _scope(headers=[("x-request-timeout-seconds", sent)]), []))
    assert len(passed) == 3
    asyncio.run(_call(ClientDeadline(app), _scope("/-/healthz", headers=[("x-request-timeout-seconds", "abc")]), []))
    assert passed[-1] == "/-/healthz"  # Ray's own endpoints are not ours to judge


def test_a_deadline_too_short_for_the_images_says_so_in_the_clients_numbers(local_client):
    files = [("f", (f"{i}.png", png(), "image/png")) for i in range(4)]
    r = local_client.post("/predict", files=files, headers={"x-request-timeout-seconds": "0.51"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "deadline_too_short", r.text
    message = r.json()["error"]["message"]
    assert "4 images" in message and "the 0.51 s its x-request-timeout-seconds gave" in message, message
    r = local_client.post("/predict", content=png(), headers={"content-type": "image/png", "x-request-timeout-seconds": "0.501"})
    assert "1 image " in r.json()["error"]["message"] and "images" not in r.json()["error"]["message"].split("take")[0], r.text


def test_rays_408_speaks_of_the_clients_deadline_when_the_client_gave_one():
    from detserve.serve.ray_errors import JsonErrors

    async def ray_408(scope, receive, send):
        await send({"type": "http.response.start", "status": 408, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Request abc timed out after 30.0s."})

    sent, _ = asyncio.run(_call(JsonErrors(ray_408), _scope("/x", headers=[("x-request-timeout-seconds", "0.7")]), []))
    message = json.loads(sent[1]["body"])["error"]["message"]
    assert "the 0.7 s its x-request-timeout-seconds header gave" in message and "30.0" not in message
    sent, _ = asyncio.run(_call(JsonErrors(ray_408), _scope("/x"), []))
    assert "the server's request timeout of 30.0 s" in json.loads(sent[1]["body"])["error"]["message"]


def test_a_header_that_claims_60000_by_60000_gets_its_size_in_the_413(local_client):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    r = local_client.post("/predict", content=header, headers=PNG_CT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels"
    assert "60000x60000 = 3600000000 pixels" in r.json()["error"]["message"], r.text


def test_not_an_image_names_exactly_the_formats_that_decode(local_client):
    from detserve.runtime.images import FORMAT_NAMES

    r = local_client.post("/predict", content=b"hello", headers=PNG_CT)
    assert r.json()["error"]["code"] == "not_an_image" and "AVIF" in r.json()["error"]["message"]
    assert all(name in r.json()["error"]["message"] for name in FORMAT_NAMES)
    from detserve.serve.protocol import BY_CODE

    assert f"({', '.join(FORMAT_NAMES)})" in BY_CODE["not_an_image"].meaning  # the registry says the same
    for fmt in ("AVIF", "WEBP", "GIF", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), "white").save(buf, format=fmt)
        assert local_client.post("/predict", content=buf.getvalue(), headers=PNG_CT).status_code == 200, fmt
    for fmt in ("TGA", "PPM", "ICO", "PCX"):  # Pillow reads them; detserve does not say it does, and refuses them
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), "white").save(buf, format=fmt)
        r = local_client.post("/predict", content=buf.getvalue(), headers=PNG_CT)
        assert r.status_code == 400 and r.json()["error"]["code"] == "not_an_image", fmt


@pytest.fixture
def serve_log(caplog):
    """Records of Ray Serve's logger (it does not propagate to the root logger caplog watches)."""
    logger = logging.getLogger("ray.serve")
    caplog.handler.setLevel(logging.INFO)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_a_client_that_disconnects_while_sending_logs_one_info_line_and_runs_nothing(local_client, serve_log):
    server = local_client.server
    decoded = server.stage_seconds["decode"]
    messages = [{"type": "http.request", "body": png()[:50], "more_body": True}, {"type": "http.disconnect"}]
    asyncio.run(_call(local_client.app, _scope(), messages))
    records = [r for r in serve_log.records if r.name == "ray.serve"]
    assert [r.levelno for r in records] == [logging.INFO], [r.getMessage() for r in records]
    assert not any(r.exc_info for r in records)
    assert server.stage_seconds["decode"] == decoded  # nothing was decoded, nothing ran


def test_a_request_cancelled_while_decoding_never_reaches_the_engine(local_client, serve_log, monkeypatch):
    """Ray cancels the handler task when the client goes away; images not yet batched are dropped."""
    server = local_client.server
    calls = {"infer": 0}
    real_decode, real_infer = server.model.detector.decode, server.model.detector.run

    def slow_decode(*args, **kwargs):
        import time

        time.sleep(0.3)
        return real_decode(*args, **kwargs)

    def counting_infer(*args, **kwargs):
        calls["infer"] += 1
        return real_infer(*args, **kwargs)

    monkeypatch.setattr(server.model.detector, "decode", slow_decode)
    monkeypatch.setattr(server.model.detector, "run", counting_infer)

    async def main():
        task = asyncio.create_task(_call(local_client.app, _scope(), [{"type": "http.request", "body": png(), "more_body": False}]))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.6)  # the decode thread finishes; its job must not be submitted

    asyncio.run(main())
    assert calls["infer"] == 0
    records = [r for r in serve_log.records if r.name == "ray.serve"]
    assert [r.levelno for r in records] == [logging.INFO] and not records[0].exc_info


# ---- the API description ------------------------------------------------------------------


def test_openapi_documents_the_three_bodies_the_response_and_every_error(local_client):
    spec = local_client.get("/openapi.json").json()
    post = spec["paths"]["/predict"]["post"]
    assert set(post["requestBody"]["content"]) == {"image/*", "multipart/form-data", "application/json"}
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ImagesJson")
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/PredictResponse")
    schemas = spec["components"]["schemas"]
    assert schemas["ImageResult"]["properties"]["annotations"]["items"]["$ref"].endswith("/BoxAnnotation")
    for status in ("400", "408", "413", "415", "422", "500", "503"):
        assert post["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody"), status
    assert "HTTPValidationError" not in schemas  # FastAPI's own 422 body is never sent
    names = {p["name"] for p in post["parameters"]}
    assert names == {"conf", "iou", "max_det"}


def test_docs_are_served_entirely_by_the_app(local_client):
    page = local_client.get("/docs")
    assert page.status_code == 200
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page.text), "a CDN or third-party URL in /docs"
    assets = re.findall(r"(?:src|href)=[\"']([^\"']+)[\"']", page.text)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets), assets
    for asset in assets:
        r = local_client.get(asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert "url: '/openapi.json'" in page.text or '"url": "/openapi.json"' in page.text or "/openapi.json" in page.text


# ---- Ray's own errors, through the proxy middleware (unit level; test_serve.py runs it in Ray) ----


@pytest.mark.parametrize(
    "status,text,headers,code",
    [
        (404, b"Path '/x' not found. Ping http://127.0.0.1:1/-/routes for available routes.", [], "not_found"),
        (503, b"Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1).", [(b"retry-after", b"1")], "overloaded"),
        (429, b"Request dropped due to backpressure", [(b"retry-after", b"2")], "overloaded"),
        (503, b"Deployment is unavailable", [], "unavailable"),
        (408, b"Request abc timed out after 1.0s.", [], "timeout"),
        (500, b"Internal Server Error", [], "internal"),
        (None, b"", [], "internal"),  # the replica died: Ray sends no response at all
    ],
)
def test_proxy_middleware_turns_rays_text_errors_into_the_contract(status, text, headers, code):
    from detserve.serve.ray_errors import JsonErrors

    async def ray_like(scope, receive, send):
        if status is None:
            return
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain; charset=utf-8"), *headers]})
        await send({"type": "http.response.body", "body": text})

    sent, _ = asyncio.run(_call(JsonErrors(ray_like), _scope("/x"), []))
    start, body = sent[0], json.loads(sent[1]["body"])
    assert start["status"] == (status or 500)
    assert body["error"]["code"] == code and body["error"]["message"]
    assert dict(start["headers"])[b"content-type"] == b"application/json"
    for key, value in headers:
        assert dict(start["headers"])[key] == value  # Retry-After kept


def test_proxy_middleware_leaves_json_and_rays_own_endpoints_alone():
    from detserve.serve.ray_errors import JsonErrors

    async def app(scope, receive, send):
        ctype = b"application/json" if scope["path"] == "/app" else b"text/plain"
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", ctype)]})
        await send({"type": "http.response.body", "body": b'{"error": {"code": "x", "message": "y"}}' if ctype == b"application/json" else b"DRAINING"})

    for path, body in (("/app", b'{"error": {"code": "x", "message": "y"}}'), ("/-/healthz", b"DRAINING")):
        sent, _ = asyncio.run(_call(JsonErrors(app), _scope(path), []))
        assert sent[1]["body"] == body


def test_the_offline_environment_installs_the_proxy_middleware():
    from detserve.runtime.offline import environment
    from detserve.serve import middleware

    module, _, name = environment()["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].partition(":")
    assert f"{module}:{name}" == middleware.IMPORT_PATH and callable(getattr(middleware, name))


def test_the_proxy_stamps_arrival_time_and_replaces_a_clients_own_stamp():
    import time

    from detserve.serve.arrival import RECEIVED_AT_HEADER, ArrivalTime

    seen = {}

    async def app(scope, receive, send):
        seen.update(scope=scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scope = _scope("/yolo/predict")
    scope["headers"] = [(RECEIVED_AT_HEADER, b"1.0"), (b"host", b"x")]
    before = time.time()
    asyncio.run(_call(ArrivalTime(app), scope, []))
    stamps = [v for k, v in seen["scope"]["headers"] if k == RECEIVED_AT_HEADER]
    assert len(stamps) == 1 and before <= float(stamps[0]) <= time.time()
    assert (b"host", b"x") in seen["scope"]["headers"]


def test_the_deadline_counts_from_the_proxys_arrival_not_the_replicas():
    import time
    from types import SimpleNamespace

    from starlette.requests import Request

    from detserve.serve.admission import ANSWER_BEFORE_TIMEOUT_S
    from detserve.serve.app import Replica, waited_since_proxy

    def request(stamp: bytes | None) -> Request:
        headers = [] if stamp is None else [(b"x-detserve-received-at", stamp)]
        return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""})

    assert 1.9 < waited_since_proxy(request(repr(time.time() - 2).encode())) < 3
    assert waited_since_proxy(request(repr(time.time() + 60).encode())) == 0.0  # a clock ahead of ours: no credit
    assert waited_since_proxy(request(b"junk")) == 0.0 and waited_since_proxy(request(None)) == 0.0
    cls = Replica  # the plain class Serve deploys
    server = SimpleNamespace(args=SimpleNamespace(request_timeout_s=30.0))
    server.budget_s = lambda timeout_s: cls.budget_s(server, timeout_s)
    deadline = cls.deadline
    now = time.monotonic()
    assert abs(deadline(server, 2.0, 0.0) - (now + 2.0 - ANSWER_BEFORE_TIMEOUT_S)) < 0.1
    assert abs(deadline(server, 2.0, 1.0) - (now + 1.0 - ANSWER_BEFORE_TIMEOUT_S)) < 0.1
    assert deadline(server, 2.0, 5.0) <= time.monotonic()  # already past: nothing is admitted


# ---- the body limit at the ingress (serve/body_limit.py), before the app receives a byte ----


def _ray_like(forwarded: list, answer_after_bytes: int | None = None):
    """Ray's proxy as BodyLimit sees it: it reads the client's body to the end (or a disconnect), forwarding
    every chunk to the replica; the replica answers 200 once it has the whole body, or its own 413 after
    ``answer_after_bytes``; a disconnect ends the call with Ray's plain-text error."""

    async def app(scope, receive, send):
        answered = False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not answered:
                    await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
                    await send({"type": "http.response.body", "body": b"Client disconnected"})
                return
            forwarded.append(message.get("body", b""))
            size = sum(map(len, forwarded))
            if answer_after_bytes is not None and size > answer_after_bytes and not answered:
                answered = True
                await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"error": {"code": "body_too_large", "message": "app"}}'})
            if not message.get("more_body", False):
                if not answered:
                    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "http.response.body", "body": str(size).encode()})
                return

    return app


def _chunked(n: int, size: int = 40) -> list[dict]:
    return [{"type": "http.request", "body": b"x" * size, "more_body": i < n - 1} for i in range(n)]


def test_the_proxy_refuses_a_content_length_over_the_routes_limit_without_calling_the_app():
    from detserve.serve.body_limit import BodyLimit

    called = []

    async def app(scope, receive, send):
        called.append(scope["path"])

    limited = BodyLimit(app, {"/small": 100})
    sent, pulled = asyncio.run(_call(limited, _scope("/small/predict", (("content-length", "101"),)), _chunked(3)))
    assert not called and pulled == 0  # not a byte read, nothing forwarded to a replica
    assert sent[0]["status"] == 413 and dict(sent[0]["headers"])[b"content-type"] == b"application/json"
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "body_too_large" and "101 bytes (its Content-Length); the limit is 100" in error["message"]
    assert dict(sent[0]["headers"])[b"connection"] == b"close"  # the rest of the upload is not read


def test_the_proxy_cuts_a_chunked_body_at_the_limit_and_what_the_app_sends_after_is_dropped():
    from detserve.serve.body_limit import BodyLimit

    forwarded: list = []
    sent, pulled = asyncio.run(_call(BodyLimit(_ray_like(forwarded), {"/small": 100}), _scope("/small/predict"), _chunked(10)))
    assert sum(map(len, forwarded)) == 80 and pulled == 3  # the chunk that crossed the limit is not forwarded
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"] and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "body_too_large"


def test_a_body_within_the_limit_and_rays_own_endpoints_pass_untouched():
    from detserve.serve.body_limit import BodyLimit

    forwarded: list = []
    sent, _ = asyncio.run(_call(BodyLimit(_ray_like(forwarded), {"/small": 100}), _scope("/small/predict"), _chunked(2)))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"80"
    forwarded = []
    sent, _ = asyncio.run(_call(BodyLimit(_ray_like(forwarded), {"/": 10}), _scope("/-/routes"), _chunked(2)))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"80"


def test_an_app_that_answers_at_its_own_lower_limit_keeps_its_answer():
    from detserve.serve.body_limit import BodyLimit

    forwarded: list = []
    sent, _ = asyncio.run(_call(BodyLimit(_ray_like(forwarded, answer_after_bytes=50), {"/small": 100}), _scope("/small/predict"), _chunked(10)))
    assert [m.get("status") for m in sent] == [413, None] and json.loads(sent[1]["body"])["error"]["message"] == "app"
    assert sum(map(len, forwarded)) == 80  # and the proxy still stopped reading at its own limit


def test_each_route_gets_the_limit_of_its_longest_prefix():
    from detserve.serve.route_limits import DEFAULT_MAX_BODY_BYTES, limit_for

    limits, default = {"/": 10, "/yolo": 20, "/yolo/big/": 30}, DEFAULT_MAX_BODY_BYTES
    assert limit_for("/yolo/predict", limits, default) == 20 and limit_for("/yolo", limits, default) == 20
    assert limit_for("/yolo/big/predict", limits, default) == 30 and limit_for("/yolo/big", limits, default) == 30
    assert limit_for("/yolox/predict", limits, default) == 10 and limit_for("/other", limits, default) == 10
    assert limit_for("/other", {"/yolo": 20}, default) == DEFAULT_MAX_BODY_BYTES


def test_the_limits_come_from_the_environment_and_a_bad_value_says_what_to_give():
    from detserve.serve.route_limits import LIMITS_ENV, body_limits_from_env

    assert body_limits_from_env({}) == {}
    assert body_limits_from_env({LIMITS_ENV: '{"/yolo": 52428800}'}) == {"/yolo": 52428800}
    for bad in ("nope", '["/yolo"]', '{"yolo": 1}', '{"/yolo": -1}', '{"/yolo": "50MB"}'):
        with pytest.raises(ValueError, match=f'{LIMITS_ENV}=.*"/<route prefix>": <max body bytes>'):
            body_limits_from_env({LIMITS_ENV: bad})


def test_detserve_serve_hands_the_proxy_each_apps_limit_and_the_body_limit_is_outermost():
    from detserve.serve import route_limits
    from detserve.serve.app import AppArgs
    from detserve.serve.body_limit import BodyLimit
    from detserve.serve.middleware import middlewares
    from detserve.runtime.paths import deploy_config
    from detserve.serve.run import load_config, proxy_body_limits

    assert proxy_body_limits(load_config(deploy_config())) == {"/yolo": 52428800, "/fasterrcnn": 52428800}
    assert route_limits.DEFAULT_MAX_BODY_BYTES == AppArgs().max_body_bytes
    assert middlewares()[-1].cls is BodyLimit  # Ray wraps in list order: the last sees requests first
