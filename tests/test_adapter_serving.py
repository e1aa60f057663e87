"""A user's own Dataloop adapter folder behind real Ray Serve: over HTTP, through a handle and from the CLI.

The session's Ray (conftest.serve_cluster); one application per folder and
model, each served as `detserve serve --adapter` serves it (its compute
config's resources and autoscaling), but pinned to one replica so that a
second one does not start in the middle of a test. Every answer is compared
with the adapter called directly, in this process, on the same image bytes.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import QUIET, ROOT, encode, free_port
from tests.test_adapter_apps import FASTERRCNN, FAULTY, TUTORIAL, UNIMPORTABLE, solid

pytestmark = pytest.mark.serve

ONE_REPLICA = {"num_replicas": 1, "autoscaling_config": None}


def serve_adapter(name: str, args: dict, options: dict | None = None) -> None:
    from ray import serve

    from detserve.serve.app import application

    serve.run(application(args, {**ONE_REPLICA, **(options or {})}), name=name, route_prefix=f"/{name}", blocking=False, logging_config=QUIET)


def direct(folder, model=None):
    """The adapter itself, loaded in this process as a replica loads it: image bytes -> its annotations' JSON."""
    from detserve.adapters.dataloop_app import read_app
    from detserve.adapters.user_adapter import RequestItem, load_adapter
    from detserve.runtime.images import probe

    app = read_app(folder)
    adapter = load_adapter(app, app.model(model))

    def annotations(data: bytes) -> list[dict]:
        [collection] = adapter.predict([adapter.prepare_item_func(RequestItem.of(data, probe(data)))])
        return collection.to_json()["annotations"]

    return annotations


def post(url: str, data: bytes, query: str = "", **headers) -> httpx.Response:
    return httpx.post(f"{url}/predict{query}", content=data, headers={"content-type": "image/png", **headers}, timeout=60)


def concurrently(url: str, bodies: list[bytes], concurrency: int = 16, headers: dict | None = None) -> list[httpx.Response]:
    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
            sem = asyncio.Semaphore(concurrency)

            async def one(body):
                async with sem:
                    return await client.post(f"{url}/predict", content=body, headers={"content-type": "image/png", **(headers or {})})

            return await asyncio.gather(*(one(b) for b in bodies))

    return asyncio.run(main())


# ---- the Dataloop tutorial's YOLO adapter, as the tutorial writes it ------------------------------


@pytest.fixture(scope="module")
def tutorial_url(serve_cluster):
    from ray import serve

    serve_adapter("yolo20n", {"adapter": str(TUTORIAL)})
    yield f"{serve_cluster}/yolo20n"
    serve.delete("yolo20n", _blocking=False)  # the replica drains meanwhile (some 30 s under HAProxy)


@pytest.fixture(scope="module")
def tutorial_direct():
    return direct(TUTORIAL)


def test_the_tutorial_adapter_answers_over_http_as_it_does_called_directly(tutorial_url, tutorial_direct, scenes):
    images = [encode(s.image) for s in scenes[:3]]
    want = [tutorial_direct(b) for b in images]
    assert sum(map(len, want)) > 0
    r = post(tutorial_url, images[0])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "yolo20n", "version": "yolo20", "backend": "adapter:Adapter", "device": "adapter"}
    [result] = body["results"]
    assert (result["width"], result["height"], result["frames"]) == (scenes[0].image.shape[1], scenes[0].image.shape[0], 1)
    assert result["annotations"] == want[0]
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
    multipart = httpx.post(f"{tutorial_url}/predict", files=files, timeout=60).json()
    as_json = httpx.post(f"{tutorial_url}/predict", json={"images": [base64.b64encode(b).decode() for b in images]}, timeout=60).json()
    for answer in (multipart, as_json):
        assert [r["annotations"] for r in answer["results"]] == want


def test_the_tutorial_adapter_through_a_handle(tutorial_url, tutorial_direct, scenes):
    from ray import serve

    handle = serve.get_app_handle("yolo20n")
    image = scenes[1].image
    want = tutorial_direct(encode(image))  # a PIL image or an array reaches the adapter as a PNG of its pixels
    for item in (encode(image), Image.fromarray(image), image):
        assert handle.predict.remote(item).result(timeout_s=60)["results"][0]["annotations"] == want
    with pytest.raises(ValueError, match="not_an_image"):
        handle.predict.remote(b"not an image").result(timeout_s=60)


def test_info_says_which_request_settings_the_adapter_reads(tutorial_url, tutorial_direct, scenes):
    info = httpx.get(f"{tutorial_url}/info", timeout=30).json()
    assert info["parameters"] == {"conf": None, "iou": None, "max_det": None}
    assert info["adapter"]["class"] == "Adapter" and info["adapter"]["pod_type"] == "regular-m" and info["batch"] == {"max": 4}
    data = encode(scenes[2].image)
    assert post(tutorial_url, data, "?conf=0.99&max_det=1").json()["results"][0]["annotations"] == tutorial_direct(data)  # ignored


def test_under_load_predict_gets_batches_and_every_answer_is_the_adapters(tutorial_url, tutorial_direct, scenes):
    images = [encode(s.image) for s in scenes]
    want = [tutorial_direct(b) for b in images]
    before = httpx.get(f"{tutorial_url}/stats", timeout=30).json()["predict_batch_sizes"]
    n = 96
    responses = concurrently(tutorial_url, [images[i % len(images)] for i in range(n)], concurrency=24)
    assert [r.status_code for r in responses] == [200] * n, {r.status_code for r in responses}
    for i, r in enumerate(responses):
        assert r.json()["results"][0]["annotations"] == want[i % len(images)]
    stats = httpx.get(f"{tutorial_url}/stats", timeout=30).json()
    calls = {int(k): v - before.get(k, 0) for k, v in stats["predict_batch_sizes"].items()}
    assert sum(k * v for k, v in calls.items()) == n  # every image went through predict once
    assert max(k for k, v in calls.items() if v) >= 2, calls  # ... in batches, of more than one image
    assert max(calls) <= 4  # never past the configuration's batch_size
    assert stats["scheduler"]["lanes"] == 1  # one predict at a time (runtime.concurrency 1)


# ---- a torchvision Faster R-CNN adapter in the style of Dataloop's app -------------------------------


@pytest.mark.slow  # a second adapter app: 10 s (tests/test_adapter_apps.py runs it without Ray)
def test_the_fasterrcnn_adapter_answers_batches_as_it_does_called_directly(serve_cluster):
    """Same-size images batch into one predict call (torchvision pads a batch to its largest image: one size, no padding)."""
    from ray import serve

    from detserve.training.synthetic import make_scene

    serve_adapter("fasterrcnn-shapes", {"adapter": str(FASTERRCNN)})
    url = f"{serve_cluster}/fasterrcnn-shapes"
    try:
        rng = np.random.default_rng(11)
        images = [encode(make_scene(rng, 320, 240).image) for _ in range(6)]
        annotations = direct(FASTERRCNN)
        want = [annotations(b) for b in images]
        assert sum(map(len, want)) > 0
        responses = concurrently(url, images * 4, concurrency=12)
        assert [r.status_code for r in responses] == [200] * 24
        for i, r in enumerate(responses):
            assert_same_boxes(r.json()["results"][0]["annotations"], want[i % 6])
        stats = httpx.get(f"{url}/stats", timeout=30).json()
        assert max(int(k) for k in stats["predict_batch_sizes"]) > 1, stats
        info = httpx.get(f"{url}/info", timeout=30).json()
        assert info["parameters"]["conf"] == "conf_threshold"
        strict = post(url, images[0], "?conf=0.9").json()["results"][0]["annotations"]
        assert all(a["metadata"]["user"]["model"]["confidence"] >= 0.9 for a in strict) and len(strict) < len(want[0])
    finally:
        serve.delete("fasterrcnn-shapes", _blocking=False)  # the replica drains meanwhile (some 30 s under HAProxy)


def assert_same_boxes(got: list[dict], want: list[dict], px: float = 1e-3, score: float = 1e-4) -> None:
    """Same boxes, labels and order; coordinates and scores to float noise (a batched forward may round differently)."""
    assert [a["label"] for a in got] == [a["label"] for a in want]
    for a, b in zip(got, want):
        for p, q in zip(a["coordinates"], b["coordinates"]):
            assert abs(p["x"] - q["x"]) <= px and abs(p["y"] - q["y"]) <= px, (a["coordinates"], b["coordinates"])
        assert abs(a["metadata"]["user"]["model"]["confidence"] - b["metadata"]["user"]["model"]["confidence"]) <= score


# ---- deliberately faulty adapters -----------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_url(serve_cluster):
    from ray import serve

    serve_adapter("faulty", {"adapter": str(FAULTY), "model": "faulty"})
    yield f"{serve_cluster}/faulty"
    serve.delete("faulty", _blocking=False)  # the replica drains meanwhile (some 30 s under HAProxy)


def test_an_image_the_adapter_cannot_prepare_gets_its_own_4xx(faulty_url):
    files = [("f", ("a.png", solid((90, 90, 90)), "image/png")), ("f", ("b.png", solid((90, 90, 90), (8, 8)), "image/png"))]
    r = httpx.post(f"{faulty_url}/predict", files=files, timeout=60)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "prepare_failed" and error["message"].startswith("image 1: ") and "needs at least 16 px" in error["message"]
    assert post(faulty_url, solid((90, 90, 90))).status_code == 200
    assert post(faulty_url, b"junk").json()["error"]["code"] == "not_an_image"  # detserve's own check comes first


@pytest.mark.parametrize("colour,code,says", [
    ((255, 0, 0), "inference_failed", "predict raised RuntimeError: a red image"),
    ((0, 255, 0), "invalid_prediction", "returned 0 result(s) for a batch of 1 image(s)"),
    ((0, 0, 255), "invalid_prediction", "predict returned a dict for image 0"),
])  # fmt: skip
def test_a_failing_predict_gets_a_500_saying_what_happened_and_the_replica_serves_on(faulty_url, colour, code, says):
    r = post(faulty_url, solid(colour))
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == code and says in r.json()["error"]["message"], r.text
    ok = post(faulty_url, solid((90, 90, 90)))
    assert ok.status_code == 200 and ok.json()["results"][0]["annotations"][0]["label"] == "quarter"


def test_a_failing_batch_fails_only_its_own_requests(faulty_url):
    """A red image and gray ones at once: only the requests that shared the red image's predict call fail."""
    before = httpx.get(f"{faulty_url}/stats", timeout=30).json()["predict_batch_sizes"]
    responses = concurrently(faulty_url, [solid((255, 0, 0))] + [solid((90, 90, 90))] * 15, concurrency=16)
    failed = [r for r in responses if r.status_code != 200]
    assert responses[0].status_code == 500 and all(r.json()["error"]["code"] == "inference_failed" for r in failed)
    sizes = httpx.get(f"{faulty_url}/stats", timeout=30).json()["predict_batch_sizes"]
    largest = max(int(k) for k, v in sizes.items() if v > before.get(k, 0))
    assert len(failed) <= largest < 16  # at most one batch's worth; the other batches were answered


def test_predict_is_never_called_from_two_threads_at_once(faulty_url):
    """The faulty adapter raises when two threads are in its predict at once; under load, none does."""
    responses = concurrently(faulty_url, [solid((90, 90, 90), (64 + i, 48)) for i in range(48)], concurrency=24)
    assert [r.status_code for r in responses] == [200] * 48, [r.text for r in responses if r.status_code != 200][:2]


@pytest.mark.slow  # 14 s
def test_a_slow_predict_is_admitted_by_its_measured_cost(serve_cluster):
    """0.5 s per image, two a batch: a deadline it cannot meet is refused at once (422), a burst is shed (503),
    and what is admitted is answered in time."""
    from ray import serve

    serve_adapter("slow", {"adapter": str(FAULTY), "model": "slow"})
    url = f"{serve_cluster}/slow"
    try:
        stats = httpx.get(f"{url}/stats", timeout=30).json()["scheduler"]
        assert 0.4 <= stats["ms_per_image_by_batch"]["1"] / 1000 <= 1.5, stats  # measured at start on predict itself
        started = time.perf_counter()
        r = post(url, solid((90, 90, 90)), **{"x-request-timeout-seconds": "0.8"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "deadline_too_short", r.text
        assert time.perf_counter() - started < 0.5  # refused at once, not after a predict
        timed = []

        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:

                async def one():
                    start = time.perf_counter()
                    r = await client.post(f"{url}/predict", content=solid((90, 90, 90)), headers={"content-type": "image/png", "x-request-timeout-seconds": "4"})
                    timed.append((r.status_code, time.perf_counter() - start))

                await asyncio.gather(*(one() for _ in range(16)))

        asyncio.run(burst())
        codes = [c for c, _ in timed]
        assert codes.count(200) >= 2 and codes.count(503) >= 4 and codes.count(408) <= 1, codes
        assert all(seconds < 4.0 for code, seconds in timed if code == 200), timed
    finally:
        serve.delete("slow", _blocking=False)  # the replica drains meanwhile (some 30 s under HAProxy)


# ---- the adapter's weights, accelerated ------------------------------------------------------------


@pytest.mark.slow  # 11 s: a second app on the session's Ray (make test-slow); test_adapter_export checks the export's boxes
def test_accelerated_serving_gives_the_adapters_boxes_within_the_export_thresholds(serve_cluster, tutorial_export, tutorial_direct, scenes):
    """`--accelerated`: the export of the tutorial adapter's weights, under the adapter's model name, its boxes."""
    from ray import serve

    from detserve.adapters.accelerate import detections_of
    from detserve.export.parity import compare_all

    serve_adapter("yolo20n-accelerated", {"adapter": str(TUTORIAL), "accelerated": True, "export": str(tutorial_export)})
    url = f"{serve_cluster}/yolo20n-accelerated"
    try:
        images = [encode(s.image) for s in scenes]
        responses = concurrently(url, images, concurrency=8)
        assert [r.status_code for r in responses] == [200] * len(images)
        assert responses[0].json()["model"]["name"] == "yolo20n" and responses[0].json()["model"]["backend"] == "onnxruntime-cpu"
        ids = {"circle": 0, "square": 1, "triangle": 2, "star": 3}
        adapter = [detections_of(tutorial_direct(b), ids) for b in images]
        export = [detections_of(r.json()["results"][0]["annotations"], ids) for r in responses]
        result = compare_all(adapter, export)  # same label, IoU >= 0.99: the export's own threshold
        assert result.source_boxes > 0 and result.matched_share >= 0.99 and result.artifact_boxes == result.source_boxes, result
        assert result.max_score_diff < 1e-3, result
        handle = serve.get_app_handle("yolo20n-accelerated")
        assert len(handle.predict.remote(scenes[0].image).result(timeout_s=60)["results"][0]["annotations"]) == len(adapter[0])
    finally:
        serve.delete("yolo20n-accelerated", _blocking=False)  # the replica drains meanwhile (some 30 s under HAProxy)


# ---- `detserve serve --adapter DIR`, as a user runs it --------------------------------------------


def _serve_cli(folder, port: int, *extra: str) -> subprocess.Popen:
    # A Ray of its own beside the session's, in a short folder (Ray's socket paths must fit in 107 bytes).
    run_dir = tempfile.mkdtemp(prefix="dsa-", dir="/tmp")
    env = {**os.environ, "DETSERVE_RAY_TMP": run_dir, "DETSERVE_METRICS_PORT": str(free_port()), "COLUMNS": "400"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)  # this Ray's own token, in its own run folder
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "detserve", "serve", "--adapter", str(folder), "--port", str(port), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT), start_new_session=True)  # fmt: skip


class _Output:
    """A child's output, read as it comes (a thread), so that a test can wait for a line."""

    def __init__(self, child: subprocess.Popen):
        self.child, self.lines = child, []
        self.reader = threading.Thread(target=lambda: self.lines.extend(child.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.child.poll() is None:
            if any(text in line for line in list(self.lines)):
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> str:
        """Ctrl-C (as a user stops it), then the whole output."""
        if self.child.poll() is None:
            os.killpg(self.child.pid, signal.SIGINT)
        try:
            self.child.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.child.pid, signal.SIGKILL)
            self.child.wait()
        self.reader.join(10)
        return "".join(self.lines)


@pytest.mark.slow  # a Ray of its own: about a minute on 2 cores
def test_detserve_serve_adapter_first_answer_is_200_with_the_adapters_boxes(tutorial_direct, scenes):
    """As the README says: start it, wait for the ready banner, send an image."""
    port = free_port()
    output = _Output(_serve_cli(TUTORIAL, port))
    data = encode(scenes[0].image)
    try:
        ready = output.wait_for("detserve is serving /yolo20n", 240)
        assert ready, output.stop()
        r = post(f"http://127.0.0.1:{port}/yolo20n", data)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["annotations"] == tutorial_direct(data)
    finally:
        text = output.stop()
    capped = [line for line in text.splitlines() if line.startswith("adapter yolo20n: regular-m asks 2 vCPU")]
    assert len(capped) <= 1, text  # one start-up line when the machine is smaller than the pods asked for


@pytest.mark.parametrize("folder,model,says", [
    pytest.param(UNIMPORTABLE, None, "model_adapter.py: cannot import the adapter module: ModuleNotFoundError: No module named 'detserve_test_package_that_is_not_installed'", marks=pytest.mark.slow),
    pytest.param(FAULTY, "unloadable", "model_adapter.py: Adapter.load(", marks=pytest.mark.slow),
])  # fmt: skip
def test_detserve_serve_adapter_that_cannot_import_or_load_stops_with_one_line(folder, model, says):
    server = _serve_cli(folder, free_port(), *(["--model", model] if model else []))
    output = server.communicate(timeout=180)[0]
    assert server.returncode == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0] and str(folder) in errors[0], output
    assert "Traceback" not in output and "Starting Ray" not in output, output  # stopped before Ray started
