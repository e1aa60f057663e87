"""Ray Serve: HTTP and handle round trips, batching under load, bad input, backpressure, timeouts.

One Ray for the session (serve_cluster), one application per module; everything
talks to 127.0.0.1 only. Requests are bounded in number and time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import LIMITED_BODY_BYTES, LIMITED_ROUTE, QUIET, encode

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def adapter(yolo_export):
    from detserve.adapters import adapter_for

    return adapter_for(yolo_export)


def expected(adapter, image: np.ndarray, **params) -> list[dict]:
    from detserve.adapters.base import to_collection

    [det] = adapter.detector.detect([image], adapter.detector.params(**params))
    return to_collection(det, adapter.labels, adapter.detector.manifest.name, None).to_json()["annotations"]


def boxes_of(annotations: list[dict]) -> list[tuple]:
    return [
        (a["label"], round(a["coordinates"][0]["x"], 3), round(a["coordinates"][0]["y"], 3),
         round(a["coordinates"][1]["x"], 3), round(a["coordinates"][1]["y"], 3),
         round(a["metadata"]["user"]["model"]["confidence"], 5))
        for a in annotations
    ]  # fmt: skip


def test_http_raw_body_matches_the_adapter(yolo_url, adapter, scenes):
    image = scenes[0].image
    r = httpx.post(f"{yolo_url}/predict", content=encode(image), headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["backend"] == "onnxruntime-cpu"
    [result] = body["results"]
    assert (result["width"], result["height"]) == (image.shape[1], image.shape[0])
    want = expected(adapter, image)
    assert len(want) > 0
    assert boxes_of(result["annotations"]) == boxes_of(want)
    assert all(a["type"] == "box" for a in result["annotations"])


def test_http_multipart_and_json_keep_input_order(yolo_url, adapter, scenes):
    images = [s.image for s in scenes[:3]]
    files = [("file", (f"{i}.png", encode(im), "image/png")) for i, im in enumerate(images)]
    multipart = httpx.post(f"{yolo_url}/predict?conf=0.3&max_det=5", files=files, timeout=30).json()
    payload = {"images": [base64.b64encode(encode(im)).decode() for im in images]}
    as_json = httpx.post(f"{yolo_url}/predict?conf=0.3&max_det=5", json=payload, timeout=30).json()
    for body in (multipart, as_json):
        assert [boxes_of(r["annotations"]) for r in body["results"]] == [
            boxes_of(expected(adapter, im, conf=0.3, max_det=5)) for im in images
        ]


def test_query_parameters_change_the_answer(yolo_url, scenes):
    data = encode(scenes[1].image)
    low = httpx.post(f"{yolo_url}/predict?conf=0.01", content=data, headers={"content-type": "image/png"}).json()
    high = httpx.post(f"{yolo_url}/predict?conf=0.9", content=data, headers={"content-type": "image/png"}).json()
    one = httpx.post(f"{yolo_url}/predict?conf=0.01&max_det=1", content=data, headers={"content-type": "image/png"}).json()
    assert len(low["results"][0]["annotations"]) > len(high["results"][0]["annotations"])
    assert len(one["results"][0]["annotations"]) == 1


def test_handle_accepts_bytes_pil_and_arrays(yolo_url, adapter, scenes):
    from ray import serve

    handle = serve.get_app_handle("yolo")
    image = scenes[2].image
    want = boxes_of(expected(adapter, image))
    for item in (encode(image), Image.fromarray(image), image):
        result = handle.predict.remote(item).result(timeout_s=30)
        assert boxes_of(result["results"][0]["annotations"]) == want
    many = handle.predict.remote([image, image], conf=0.5).result(timeout_s=30)
    assert len(many["results"]) == 2
    with pytest.raises(ValueError, match="not_an_image"):
        handle.predict.remote(b"not an image").result(timeout_s=30)


BAD_INPUTS = [
    (b"", "image/jpeg", "", 400, "empty"),
    (b"hello", "image/jpeg", "", 400, "not_an_image"),
    ("truncated", "image/jpeg", "", 400, "corrupt_image"),
    (b"x", "text/plain", "", 415, "unsupported_media_type"),
    (b'{"images": ["!!!"]}', "application/json", "", 400, "bad_base64"),
    (b'{"images": "nope"}', "application/json", "", 422, "bad_json_shape"),
    (b"{not json", "application/json", "", 400, "bad_json"),
    ("png", "image/png", "?conf=2", 422, "invalid_parameter"),
    ("png", "image/png", "?max_det=0", 422, "invalid_parameter"),
    ("png", "image/png", "?iou=abc", 422, "invalid_parameter"),
    ("bomb", "image/png", "", 413, "too_many_pixels"),
]


@pytest.mark.parametrize("body,ctype,query,status,code", BAD_INPUTS)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(yolo_url, scenes, body, ctype, query, status, code):
    if body == "truncated":
        body = encode(scenes[0].image, "JPEG")[:300]
    elif body == "png":
        body = encode(scenes[0].image)
    elif body == "bomb":  # 9000 x 9000 = 81 MP > the 40 MP default; tiny as a PNG, refused from its header
        buf = io.BytesIO()
        Image.new("L", (9000, 9000)).save(buf, format="PNG")
        body = buf.getvalue()
    r = httpx.post(f"{yolo_url}/predict{query}", content=body, headers={"content-type": ctype}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    ok = httpx.post(f"{yolo_url}/predict", content=encode(scenes[0].image), headers={"content-type": "image/png"}, timeout=30)
    assert ok.status_code == 200


def test_one_bad_image_in_a_multipart_request_names_its_index(yolo_url, scenes):
    files = [("f", ("a.png", encode(scenes[0].image), "image/png")), ("f", ("b.png", b"junk", "image/png"))]
    r = httpx.post(f"{yolo_url}/predict", files=files, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("image 1:")


def test_concurrent_load_every_request_answered_once_and_batches_fill(yolo_url, adapter, scenes):
    images = [encode(s.image) for s in scenes]
    want = [boxes_of(expected(adapter, s.image)) for s in scenes]
    before = httpx.get(f"{yolo_url}/stats").json()
    n_requests, concurrency = 240, 32

    async def main():
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            sem = asyncio.Semaphore(concurrency)

            async def one(i):
                async with sem:
                    r = await client.post(f"{yolo_url}/predict", content=images[i % len(images)], headers={"content-type": "image/png"})
                    return i, r.status_code, r.json()

            return await asyncio.gather(*(one(i) for i in range(n_requests)))

    started = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - started
    assert sorted(i for i, _, _ in results) == list(range(n_requests))  # each answered exactly once
    assert all(status == 200 for _, status, _ in results), [(s, b) for _, s, b in results if s != 200][:3]
    for i, _, body in results:
        assert boxes_of(body["results"][0]["annotations"]) == want[i % len(images)]
    after = httpx.get(f"{yolo_url}/stats").json()
    new_batches = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert sum(k * v for k, v in new_batches.items()) == n_requests
    formed = {k: v for k, v in new_batches.items() if v > 0}
    target = after["scheduler"]["target_batch_size"]  # moves as every batch updates the measured curve
    assert max(formed) <= after["scheduler"]["max_batch_size"], (formed, after["scheduler"])  # the cap is a bound
    if target > 1:
        # ... and under load batches of more than one image form. Not how full they are on average: from a short
        # queue the policy runs singles on purpose (tests/test_scheduler.py), and how many images are ready at once
        # depends on how fast the replica's own HTTP server takes requests in (the HAProxy ingress) against the
        # engine: in two runs of 240 requests the batches were {1: 116, 2: 58, 4: 2} and {1: 186, 2: 27}.
        assert max(formed) >= 2, formed
    assert after["scheduler"]["outstanding_images"] == 0
    assert elapsed < 120


@pytest.fixture(scope="module")
def slow_url(serve_cluster, yolo_export):
    """One replica, one lane, batches of one: easy to overload on purpose."""
    from ray import serve

    from detserve.serve.app import application

    options = {
        "autoscaling_config": None,
        "num_replicas": 1,
        "user_config": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
    }
    serve.run(application({"model": str(yolo_export), "lanes": 1}, options), name="narrow", route_prefix="/narrow",
              blocking=False, logging_config=QUIET)  # fmt: skip
    yield f"{serve_cluster}/narrow"
    serve.delete("narrow")


def test_overload_is_refused_at_once_by_predicted_deadline_with_a_computed_retry_after(slow_url, scenes):
    data = encode(scenes[0].image)
    stats = httpx.get(f"{slow_url}/stats").json()["scheduler"]
    assert stats["images_per_s"] > 0 and stats["ms_per_image_by_batch"]
    # A burst that each give the server 1.5 s (1.0 s once the proxy's margin is off): about twice what fits.
    headers = {"content-type": "image/png", "x-request-timeout-seconds": "1.5"}
    n = min(120, max(48, math.ceil(2 * 1.0 * stats["images_per_s"])))  # capped: more at once only measures the event loop

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:

            async def one():
                start = time.perf_counter()
                r = await client.post(f"{slow_url}/predict", content=data, headers=headers)
                return r, time.perf_counter() - start

            return await asyncio.gather(*(one() for _ in range(n)))

    asyncio.run(main())  # the first burst calibrates the replica (what decode and the shared cores add)
    results = asyncio.run(main())
    codes = [r.status_code for r, _ in results]
    late = [(r.json()["error"]["code"], round(s, 2)) for r, s in results if r.status_code == 408]
    assert set(codes) <= {200, 503, 408}, codes
    # Whatever was accepted was answered in time, but for a few the prediction got wrong (2 shared cores: the
    # burst itself, the proxy and this client take CPU from the engine while it drains).
    assert len(late) <= 0.05 * n and all(code == "deadline_exceeded" for code, _ in late), (late, n)
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    assert all("x-detserve-admit" not in r.headers for r, _ in results)  # internal: HAProxy strips it
    for r, seconds in results:
        if r.status_code == 408:
            continue
        if r.status_code == 503:  # detserve's rule, in the replica or in HAProxy, never Ray's queue: it says who
            assert r.json()["error"]["code"] == "overloaded"
            assert r.headers["x-detserve-refused-by"] in ("replica", "haproxy") and int(r.headers["retry-after"]) >= 1
            assert seconds < 1.0  # refused at once, not after queueing
        else:
            assert seconds < 1.5
    after = httpx.post(f"{slow_url}/predict", content=data, headers={"content-type": "image/png"}, timeout=60)
    assert after.status_code == 200, (after.headers, after.text, httpx.get(f"{slow_url}/stats").json()["scheduler"])


@pytest.mark.slow  # 400 requests: 15 s
def test_a_burst_with_the_retrying_client_all_ends_in_200(slow_url, scenes):
    """400 requests at once: clients that honour Retry-After (503, or a 408 whose images were dropped) all succeed."""
    from concurrent.futures import ThreadPoolExecutor

    from detserve.serve.client import Client

    base, app = slow_url.rsplit("/", 1)
    data = encode(scenes[0].image)
    n = 400  # the burst: all of it ends in 200 within 60 s

    def one(i: int) -> dict[int, int]:
        with Client(base, app=app, retries=8, timeout=60) as client:
            client._http.headers["x-request-timeout-seconds"] = "8"  # 400 take about 5 s here: a slower machine sheds
            client.predict(data)
            return client.retried_by_status

    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        retried = list(pool.map(one, range(n)))  # raises if any request did not end in 200
    print("BURST", time.perf_counter() - started, {k: sum(r.get(k, 0) for r in retried) for k in (503, 408, 500)}, httpx.get(f"{slow_url}/stats").json()["scheduler"].get("images_per_s"))
    assert time.perf_counter() - started < 60
    # Admission predicted well: a mispredicted 408 is rare (a shared 2-core machine may slow the engine mid-burst).
    assert sum(r.get(408, 0) for r in retried) <= n // 10, retried


def test_a_deadline_nothing_can_meet_is_refused_with_422(slow_url, scenes):
    files = [("f", (f"{i}.png", encode(scenes[0].image), "image/png")) for i in range(32)]
    r = httpx.post(f"{slow_url}/predict", files=files, headers={"x-request-timeout-seconds": "0.6"}, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "deadline_too_short"


MIXED_FORMATS = ("jpeg", "exif", "gray", "rgba", "palette", "cmyk", "png16", "progressive")


def mixed_photos(photos: list[np.ndarray]) -> list[tuple[bytes, str]]:
    """Real photos (Ultralytics' two) in the encodings users send: EXIF-rotated, gray, RGBA, palette, CMYK, 16-bit, progressive."""
    out = []
    for image in photos:
        pil = Image.fromarray(image)
        exif = Image.Exif()
        exif[0x0112] = 6
        gray16 = Image.fromarray(np.asarray(pil.convert("L")).astype(np.uint16) * 257)
        for kind in MIXED_FORMATS:
            buf = io.BytesIO()
            {"jpeg": lambda: pil.save(buf, "JPEG", quality=90), "exif": lambda: pil.save(buf, "JPEG", quality=90, exif=exif),
             "gray": lambda: pil.convert("L").save(buf, "PNG"), "rgba": lambda: pil.convert("RGBA").save(buf, "PNG"),
             "palette": lambda: pil.convert("P").save(buf, "PNG"), "cmyk": lambda: pil.convert("CMYK").save(buf, "JPEG"),
             "png16": lambda: gray16.save(buf, "PNG"), "progressive": lambda: pil.save(buf, "JPEG", progressive=True)}[kind]()  # fmt: skip
            out.append((buf.getvalue(), "image/png" if kind in ("gray", "rgba", "palette", "png16") else "image/jpeg"))
    return out


@pytest.mark.slow  # 18 s: 300 requests of real photos on 2 cores (make test-slow)
def test_a_cold_burst_of_mixed_photos_gets_a_503_only_when_the_answers_show_it_could_not_be_served(serve_cluster, yolo_export, photos):
    """The rule: a request is refused only if the replica's own answers show it could not have been answered before
    its deadline. Concretely: every refused request's deadline comes before the last answer of the burst (had it been
    admitted, it would have waited at least that long); and every 503 is detserve's, with its computed Retry-After."""
    from ray import serve

    from detserve.serve.app import application

    options = {"num_replicas": 1, "autoscaling_config": None}
    serve.run(application({"model": str(yolo_export)}, options), name="cold", route_prefix="/cold", blocking=False, logging_config=QUIET)
    url = f"{serve_cluster}/cold/predict"
    try:
        bodies = mixed_photos(photos)
        n, timeout_s = 200, 30.0

        async def main():
            async with httpx.AsyncClient(timeout=90, limits=httpx.Limits(max_connections=None)) as client:
                start = time.perf_counter()

                async def one(i):
                    body, ctype = bodies[i % len(bodies)]
                    r = await client.post(url, content=body, headers={"content-type": ctype})
                    return r, time.perf_counter() - start

                return await asyncio.gather(*(one(i) for i in range(n)))

        results = asyncio.run(main())
        codes = [r.status_code for r, _ in results]
        assert set(codes) <= {200, 503}, [(r.status_code, r.text[:200]) for r, _ in results if r.status_code not in (200, 503)]
        last_answer_s = max(t for r, t in results if r.status_code == 200)
        for r, _ in results:
            if r.status_code == 503:
                assert r.headers["x-detserve-refused-by"] in ("replica", "haproxy") and int(r.headers["retry-after"]) >= 1
                # sent at 0 (the burst), due at timeout_s: refused rightly only if the answers went on past that
                assert timeout_s < last_answer_s, (codes.count(503), last_answer_s, r.json())
    finally:
        serve.delete("cold")


def test_a_request_whose_pixels_cannot_be_decoded_in_time_is_refused_at_once_not_after_the_work(yolo_url, scenes):
    """64 flat gray 6000 x 6000 PNGs (2.3 gigapixels, 3 MB of JSON): refused at once, by the pixels in their headers,
    or answered within the deadline; never a 408 after the work. A one-image request beside it is answered."""
    buf = io.BytesIO()
    Image.new("L", (6000, 6000), 128).save(buf, "PNG")
    body = {"images": [base64.b64encode(buf.getvalue()).decode()] * 64}
    start = time.perf_counter()
    r = httpx.post(f"{yolo_url}/predict", json=body, timeout=60)
    took = time.perf_counter() - start
    assert r.status_code in (200, 422), r.text[:300]
    if r.status_code == 422:
        assert r.json()["error"]["code"] == "deadline_too_short" and "megapixels" in r.json()["error"]["message"]
        assert took < 5.0, took  # at once: reading and base64 of the body, no decode
    small = httpx.post(f"{yolo_url}/predict", content=encode(scenes[0].image), headers={"content-type": "image/png"}, timeout=60)
    assert small.status_code == 200
    stats = httpx.get(f"{yolo_url}/stats").json()["scheduler"]
    assert stats["outstanding_images"] == 0 and stats["decode_ms_per_mp"]["png"] > 0


def test_a_wrong_prediction_gives_a_json_408_and_drops_the_rest(local_client, scenes):
    """Admitted on a prediction that then proves wrong (here the engine turns slow after admission): a JSON 408,
    and the images not yet in a batch are dropped, not run for nobody."""
    server = local_client.server
    ran: list[int] = []
    detector = server.model.detector
    original = detector.run

    def slow_run(images, params, times=None):
        ran.append(len(images))
        time.sleep(0.4)
        return original(images, params, times)

    settings_ = server.scheduler.settings
    cap, settings_.max_batch_size = settings_.max_batch_size, 1  # one image a batch: some start, the rest wait
    detector.run = slow_run
    try:
        files = [("f", (f"{i}.png", encode(scenes[i].image), "image/png")) for i in range(4)]
        r = local_client.post("/predict", files=files, headers={"x-request-timeout-seconds": "1.2"})
    finally:
        detector.run, settings_.max_batch_size = original, cap
    assert r.status_code == 408, r.text
    assert r.headers["content-type"] == "application/json" and r.json()["error"]["code"] == "deadline_exceeded"
    time.sleep(0.5)
    assert sum(ran) < 4 and server.scheduler.outstanding == 0  # what had not started when the deadline passed was dropped


def test_python_http_client(yolo_url, adapter, scenes):
    from detserve.serve.client import Client, DetserveError

    base, app = yolo_url.rsplit("/", 1)
    with Client(base, app=app) as client:
        one = client.predict(scenes[0].image)
        assert boxes_of(one.results[0]["annotations"]) == boxes_of(expected(adapter, scenes[0].image))
        two = client.predict(scenes[0].image, encode(scenes[1].image), conf=0.5)
        assert len(two.results) == 2
        assert client.info()["labels"]
        with pytest.raises(DetserveError) as err:
            client.predict(b"nope")
        assert err.value.status == 400 and err.value.code == "not_an_image"


@pytest.mark.slow  # a replica killed and replaced: 30 s (tests/test_cluster.py loses a whole node, also slow)
def test_a_dead_replica_is_replaced_and_in_flight_requests_get_an_answer(serve_cluster, yolo_export, scenes):
    """Kill the only replica mid-load: every request gets a response (no silence), then service resumes."""
    import ray
    from ray import serve

    from detserve.serve.app import application

    options = {"num_replicas": 1, "autoscaling_config": None, "max_ongoing_requests": 16,
               "user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05}}  # fmt: skip
    serve.run(application({"model": str(yolo_export)}, options), name="fragile", route_prefix="/fragile", blocking=False, logging_config=QUIET)
    url = f"{serve_cluster}/fragile/predict"
    big = encode(np.asarray(Image.fromarray(scenes[0].image).resize((1200, 900))))
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "fragile" in a["name"] and "DetectionServer" in a["name"]]
    assert len(replicas) == 1, replicas
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])

    async def main():
        async with httpx.AsyncClient(timeout=90) as client:
            pending = [asyncio.create_task(client.post(url, content=big, headers={"content-type": "image/png"})) for _ in range(12)]
            await asyncio.sleep(0.3)
            ray.kill(victim, no_restart=True)
            return await asyncio.gather(*pending, return_exceptions=True)

    try:
        responses = asyncio.run(main())
        assert all(isinstance(r, httpx.Response) for r in responses), responses  # nothing hung or dropped
        assert {r.status_code for r in responses} <= {200, 500, 503}, [r.status_code for r in responses]
        deadline = time.monotonic() + 90
        while True:  # Ray starts a new replica; the application answers again
            r = httpx.post(url, content=encode(scenes[0].image), headers={"content-type": "image/png"}, timeout=30)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.status_code == 200, r.text
    finally:
        serve.delete("fragile")


@pytest.mark.slow  # a Faster R-CNN app: 16 s (tests/test_fasterrcnn_batched.py checks the batching without Ray)
def test_fasterrcnn_batches_run_as_one_engine_call_with_each_images_own_boxes(serve_cluster, fasterrcnn_export):
    """Same-size images batch into one call of the one graph; every answer equals that image alone."""
    from ray import serve

    from detserve.adapters import adapter_for
    from detserve.training.synthetic import make_scene
    from detserve.serve.app import application

    options = {"num_replicas": 1, "autoscaling_config": None, "max_ongoing_requests": 16,
               "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05, "batch_policy": "fixed"}}  # fmt: skip
    serve.run(application({"model": str(fasterrcnn_export)}, options), name="frcnn", route_prefix="/frcnn", blocking=False, logging_config=QUIET)
    try:
        rng = np.random.default_rng(11)
        images = [make_scene(rng, 320, 240).image for _ in range(8)]  # one size: one padded shape
        local = adapter_for(fasterrcnn_export)
        want = [boxes_of(expected(local, im, conf=0.2)) for im in images]
        assert sum(map(len, want)) > 0

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(
                    client.post(f"{serve_cluster}/frcnn/predict?conf=0.2", content=encode(im), headers={"content-type": "image/png"})
                    for im in images * 3
                ))  # fmt: skip

        responses = asyncio.run(main())
        assert [r.status_code for r in responses] == [200] * 24
        for i, r in enumerate(responses):
            assert boxes_of(r.json()["results"][0]["annotations"]) == want[i % 8]
        stats = httpx.get(f"{serve_cluster}/frcnn/stats").json()
        assert max(int(k) for k in stats["batch_sizes"]) > 1, stats  # several images, one engine call
    finally:
        serve.delete("frcnn")


def test_metrics_reach_rays_prometheus_endpoint(yolo_url, metrics_port, scenes):
    """detserve's own metrics (batch size, stage times, images, errors) are scraped with Serve's."""
    for _ in range(3):
        httpx.post(f"{yolo_url}/predict", content=encode(scenes[0].image), headers={"content-type": "image/png"}, timeout=30)
    httpx.post(f"{yolo_url}/predict", content=b"junk", headers={"content-type": "image/png"}, timeout=30)
    wanted = ("detserve_images_total", "detserve_batch_size", "detserve_engine_seconds", "detserve_decode_seconds",
              "detserve_errors_total", "ray_serve_num_http_requests")  # fmt: skip
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # Ray exports metrics every few seconds
        try:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        except httpx.HTTPError:
            text = ""
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing
    assert 'kind="not_an_image"' in text


def test_the_ready_banners_curl_line_works_as_printed(yolo_url, scenes, tmp_path):
    """The curl that `detserve serve` prints, run by a shell exactly as printed, gets boxes back."""
    import json
    import shlex
    import subprocess
    from urllib.parse import urlsplit

    from detserve.serve.run import banner

    sample = tmp_path / "a sample.jpg"  # a space: the path must be quoted in the printed line
    sample.write_bytes(encode(scenes[0].image, "JPEG", quality=95))
    url = urlsplit(yolo_url)
    lines = banner(["/yolo"], "0.0.0.0", url.port, 8080, sample)
    [curl] = [line.strip() for line in lines if line.strip().startswith("curl ")]
    assert shlex.split(curl)[-1] == f"@{sample}"
    done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["model"]["name"] and len(body["results"][0]["annotations"]) > 0
    assert any(line.strip().startswith("API docs") and f"{url.port}/yolo/docs" in line for line in lines)
    assert any("http://127.0.0.1:8080/metrics" in line for line in lines)


def test_detserve_status_names_each_app_and_its_classes(yolo_url):
    from typer.testing import CliRunner

    from detserve.cli import app

    base = yolo_url.rsplit("/yolo", 1)[0]
    result = CliRunner().invoke(app, ["status", "--url", base])
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("/yolo")]
    assert "ok" in line and "circle, square, triangle, star" in line


def test_rays_own_unknown_route_404_is_json(serve_cluster):
    r = httpx.get(f"{serve_cluster}/no-such-app/predict", timeout=30)
    assert r.status_code == 404 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["code"] == "not_found" and "/-/routes" in r.json()["error"]["message"]
    assert httpx.get(f"{serve_cluster}/-/routes", timeout=30).status_code == 200  # Ray's own endpoints untouched


def _refused_uploads(url: str, size: int, rounds: int, chunked: bool) -> list[tuple]:
    """``rounds`` uploads of ``size`` bytes, each refused: (status, code, who refused it, Connection) per answer;
    ("closed",) when the server closed the connection before the client had sent it all and read the answer."""
    boundary = "detservelimit"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'.encode()
    chunk = b"\0" * (1024 * 1024)
    whole = head + b"\0" * (size - len(head)) if not chunked else None

    def stream():
        yield head
        for _ in range(size // len(chunk)):
            yield chunk

    answers = []
    # A write that makes no progress for 10 s: HAProxy 2.8 answered the 413 but stopped reading the rest without
    # closing (it cannot drain an early-answered request: haproxy/haproxy#2404), about one upload in 40.
    with httpx.Client(timeout=httpx.Timeout(120, write=10)) as client:
        for _ in range(rounds):
            try:
                r = client.post(f"{url}/predict", content=stream() if chunked else whole,
                                headers={"content-type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
                answers.append((r.status_code, r.json()["error"]["code"], r.headers.get("x-detserve-refused-by"), r.headers.get("connection")))
            except httpx.TransportError:  # the server closed the connection before the client had sent it all
                answers.append(("closed",))
    return answers


@pytest.mark.parametrize(
    "size, limit",
    # 13 s and 20 s (a third app on the session's Ray, 40 uploads each): behind -m slow (make test-slow).
    # test_ingress.py checks every refusal and its closed connection in make test.
    [pytest.param(20 * 1024 * 1024, LIMITED_BODY_BYTES, id="20MiB-over-2MiB", marks=pytest.mark.slow),
     pytest.param(200 * 1024 * 1024, 50 * 1024 * 1024, id="200MiB-over-50MiB", marks=pytest.mark.slow)],
)  # fmt: skip
def test_rejected_uploads_cost_the_replica_no_memory(serve_cluster, yolo_export, scenes, size, limit):
    """20 uploads with a Content-Length and 20 chunked ones, each far over the route's limit, all refused: the first in
    HAProxy before a replica sees a byte, the second cut at the limit in the replica, whose connection then closes
    (a client waiting for the close is not left hanging). The replica's RSS ends within 2 % of where it started."""
    from ray import serve

    from detserve.serve import ingress
    from detserve.serve.app import application

    route = LIMITED_ROUTE if limit == LIMITED_BODY_BYTES else "/unlimited"  # conftest gives /limited its 2 MiB at the ingress
    options = {"num_replicas": 1, "autoscaling_config": None}
    args = {"model": str(yolo_export), "max_body_bytes": limit}
    serve.run(application(args, options), name="limits", route_prefix=route, blocking=False, logging_config=QUIET)
    url = f"{serve_cluster}{route}"
    try:
        for _ in range(3):  # warm: the replica has answered, and cut one upload of each kind, before the baseline
            ok = httpx.post(f"{url}/predict", content=encode(scenes[0].image), headers={"content-type": "image/png"}, timeout=60)
            assert ok.status_code == 200, ok.text
        _refused_uploads(url, size, 1, chunked=True)
        _refused_uploads(url, size, 1, chunked=False)
        baseline = httpx.get(f"{url}/stats", timeout=30).json()["rss_bytes"]
        with_length = _refused_uploads(url, size, 20, chunked=False)
        chunked = _refused_uploads(url, size, 20, chunked=True)
        time.sleep(1)  # the replica gives freed memory back a moment after a refusal (serve/http.py)
        after = httpx.get(f"{url}/stats", timeout=30).json()["rss_bytes"]
    finally:
        serve.delete("limits")
    haproxy = ingress.chosen() == "haproxy"
    answered = [a for a in with_length + chunked if a[0] != "closed"]
    assert answered and all(a[:2] == (413, "body_too_large") for a in answered), with_length + chunked
    assert all(a[3] == "close" for a in answered), answered  # the connection closes after every refusal
    if haproxy:  # a Content-Length over the limit is HAProxy's to refuse; a chunked body is cut by the replica
        assert all(a[2] == "haproxy" for a in with_length if a[0] != "closed"), with_length
        assert all(a[2] is None for a in chunked if a[0] != "closed"), chunked
    assert after <= 1.02 * baseline, (baseline, after, (after - baseline) / baseline)


def test_the_deadline_header_is_used_or_refused_through_the_real_ingress(yolo_url, scenes):
    data, png = encode(scenes[0].image), {"content-type": "image/png"}
    for sent in ("0", "-1", "abc", "nan", "inf", "1e9"):
        r = httpx.post(f"{yolo_url}/predict", content=data, headers={**png, "x-request-timeout-seconds": sent}, timeout=30)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_deadline", (sent, r.text)
        assert r.json()["error"]["message"].startswith(f"x-request-timeout-seconds: {sent} ")
    for sent in ("0.001", "0.3"):  # Ray's own timer would have answered 0.001 with a 408 about the server's 30 s
        r = httpx.post(f"{yolo_url}/predict", content=data, headers={**png, "x-request-timeout-seconds": sent}, timeout=30)
        assert r.status_code == 422 and r.json()["error"]["code"] == "deadline_too_short", (sent, r.text)
        assert f"x-request-timeout-seconds: {sent} leaves no time" in r.json()["error"]["message"]
    r = httpx.post(f"{yolo_url}/predict", content=data, headers={**png, "x-request-timeout-seconds": "10"}, timeout=30)
    assert r.status_code == 200, r.text


def test_the_handle_raises_the_http_apis_typed_errors(yolo_url):
    from ray import serve

    from detserve.serve.protocol import BadImage, BadRequest, DetserveError

    handle = serve.get_app_handle("yolo")
    with pytest.raises(BadImage) as err:
        handle.predict.remote(b"not an image").result(timeout_s=30)
    assert isinstance(err.value, (ValueError, DetserveError)) and err.value.code == "not_an_image" and err.value.status == 400
    with pytest.raises(BadRequest) as err:
        handle.predict.remote(b"x", timeout_s=-1).result(timeout_s=30)
    assert err.value.code == "invalid_deadline" and "timeout_s: -1 is not greater than 0" in err.value.message
