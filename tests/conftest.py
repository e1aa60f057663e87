"""Shared fixtures: offline environment, default-model exports made once per session."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest

import detserve.runtime.offline
from detserve.benchmarks.ports import free_port  # noqa: F401  (the tests' one way to get a port)

detserve.runtime.offline.apply()
# A deleted application's replica otherwise holds its HTTP server open for 30 s under the HAProxy ingress (Ray's
# direct-ingress draining floor, for load balancers to deregister it): each serve.delete in the suite waited that
# long. Nothing balances across the test Ray's replicas. Read by every Ray process at start, so set before it.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")

ROOT = Path(__file__).resolve().parent.parent


# --- no network ---------------------------------------------------------------

_LOCAL_HOSTS = {"127.0.0.1", "::1", "localhost", None}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach a host other than loopback fails the test (even if dtlpy swallows the error)."""
    attempts: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in _LOCAL_HOSTS:
            attempts.append(f"connect {address}")
            raise ConnectionRefusedError(f"offline test: no connection to {address}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in _LOCAL_HOSTS:
            attempts.append(f"resolve {host!r}")
            raise socket.gaierror(f"offline test: no lookup of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert not attempts, f"the test tried to reach the network: {attempts}"


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    from detserve.export.reference import photos as _photos

    return _photos()


@pytest.fixture(scope="session")
def scenes():
    from detserve.training.synthetic import scenes as _scenes

    return _scenes(8, seed=4321)


@pytest.fixture(scope="session")
def yolo_export(tmp_path_factory) -> Path:
    """The default YOLO weights exported once per session (ONNX, parity checked)."""
    from detserve.export.pipeline import ExportRequest, export_model

    out = tmp_path_factory.mktemp("exports") / "yolo"
    export_model(ExportRequest(model="yolo", weights=ROOT / "models" / "yolo-shapes.pt", out=out, quiet=True))
    return out


@pytest.fixture(scope="session")
def fasterrcnn_export(tmp_path_factory) -> Path:
    from detserve.export.pipeline import ExportRequest, export_model

    out = tmp_path_factory.mktemp("exports") / "fasterrcnn"
    export_model(
        ExportRequest(
            model="fasterrcnn",
            weights=ROOT / "models" / "fasterrcnn-shapes.pth",
            out=out,
            quiet=True,
        )
    )
    return out


#: Access logs off in tests: every request would print a line into the output.
QUIET = {"enable_access_log": False, "log_level": "WARNING"}


@pytest.fixture(scope="session")
def metrics_port() -> int:
    return free_port()


#: An application of the session's Ray with a small body limit, in its args and in the proxy's.
LIMITED_ROUTE, LIMITED_BODY_BYTES = "/limited", 2 * 1024 * 1024


@pytest.fixture(scope="session")
def serve_cluster(metrics_port):
    """One embedded Ray for the session, started as `detserve serve` starts it (start_ray); yields the HTTP base URL."""
    from ray import serve

    from detserve.serve.run import set_proxy_body_limits, shutdown, start_ray

    # The proxy's body limits are read when Ray starts, as under `detserve serve`: the
    # /limited app of test_serve.py has 2 MiB; every other route the default 50 MiB.
    set_proxy_body_limits({LIMITED_ROUTE: LIMITED_BODY_BYTES})
    # Logical CPUs are scheduling accounting only: this session runs several
    # small apps at once (one replica each, num_cpus=1), more than 2 cores' worth.
    start_ray(num_cpus=8, metrics_port=metrics_port)
    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 30},
        logging_config=QUIET,
    )
    yield f"http://127.0.0.1:{port}"
    shutdown()


def orientation_exif(orientation: int):
    """EXIF that tells a viewer to turn the stored pixels (tag 0x0112: 3 half turn, 6 and 8 quarter turns)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.fixture(scope="session")
def yolo_url(serve_cluster, yolo_export):
    """The default YOLO as an application of the session's Ray, for every module that needs one running (its
    URL prefix, ``.../yolo``). One replica: an autoscaled second one would start (and warm up, taking a core)
    in the middle of a later test."""
    from ray import serve

    from detserve.serve.app import application

    options = {"num_replicas": 1, "autoscaling_config": None, "max_ongoing_requests": 32,
               "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02}}  # fmt: skip
    serve.run(application({"model": str(yolo_export)}, options), name="yolo", route_prefix="/yolo", blocking=False, logging_config=QUIET)
    return f"{serve_cluster}/yolo"


def encode(image: np.ndarray, fmt: str = "PNG", *, orientation: int | None = None, **kwargs) -> bytes:
    """``image`` as a file in ``fmt`` (Pillow's save options in ``kwargs``), with an EXIF orientation if given."""
    from PIL import Image

    if orientation is not None:
        kwargs["exif"] = orientation_exif(orientation)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def local_client(yolo_export):
    """The real FastAPI app of a replica around the real server class, in this process: no Ray.

    ``Replica`` is the plain class Serve deploys (``DetectionServer``). Its scheduler is
    plain asyncio, so decode, admission, batching, limits, errors and encoding are the
    deployment's own. Small limits so the limit tests stay fast.
    """
    from starlette.testclient import TestClient

    from detserve.serve.app import Replica
    from detserve.serve.http import build_api

    server = Replica({"model": str(yolo_export), "max_body_bytes": 2 * 1024 * 1024, "max_images": 4})
    with TestClient(build_api(server), raise_server_exceptions=False) as client:
        client.server = server
        yield client


@pytest.fixture(scope="session")
def tutorial_export(tmp_path_factory) -> Path:
    """The Dataloop tutorial adapter's weights exported by `detserve export --adapter` once per session (parity checked)."""
    from detserve.adapters.accelerate import accelerate

    out, parity = accelerate(ROOT / "adapters" / "apps" / "examples" / "yolo-tutorial", out=tmp_path_factory.mktemp("accelerated") / "yolo20n", quiet=True)
    assert parity.passed, parity.summary()
    return out
