"""A small HTTP client for detserve, for users outside Ray.

    from detserve.serve.client import Client

    with Client("http://127.0.0.1:8000", app="yolo") as client:
        result = client.predict("bus.jpg", conf=0.3)
        for box in result.results[0]["annotations"]:
            print(box["label"], box["coordinates"])

Errors from the server raise the exception class of their code's family
(serve/protocol.py), each a :class:`DetserveError` with its ``status``, ``code``
and ``message``, which say what to change: :class:`BadRequest` (with
:class:`BadImage`, :class:`TooLarge` and :class:`DeadlineTooShort` under it),
:class:`DeadlineExceeded`, :class:`Overloaded` (``retry_after_s``) and
:class:`ServerError`. The Ray handle raises the same classes.

A busy server answers 503 at once with the time it expects to have room
(``Retry-After``). ``Client(retries=5)`` waits that long (with jitter, so a
burst of clients does not come back together) and tries again, up to that
many times; without it (the default) the 503 is raised at once. A 408 (the
server admitted the request, its prediction was wrong, and it dropped the
images it had not run) and a 500 ``internal`` (the replica serving it died)
are retried the same way: prediction is idempotent, and nothing is left
running for it. A 500 ``inference_failed`` is not: the model would fail again.
"""

from __future__ import annotations

import functools
import io
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from detserve.serve.protocol import (  # noqa: F401  (the client's exceptions, importable from here)
    BadImage, BadRequest, DeadlineExceeded, DeadlineTooShort, DetserveError, Overloaded, ServerError, TooLarge, error_class,
)  # fmt: skip


@dataclass
class Prediction:
    model: dict[str, Any]
    results: list[dict[str, Any]]  # per image: width, height, annotations (Dataloop box JSON)


@functools.cache
def _ssl_context():
    """One verified TLS context per process: httpx builds a new one per client (about 65 ms of CPU loading the CA
    bundle on a 2-core machine), which a burst of 400 clients turns into 26 s of client CPU before the first byte."""
    return httpx.create_ssl_context()


def _to_bytes(image: Any) -> tuple[bytes, str]:
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes(), "application/octet-stream"
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), "application/octet-stream"
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    raise TypeError(f"cannot send {type(image).__name__}: pass a path, bytes, a PIL image or an RGB array")


def retry_wait_s(retry_after: str | None, max_wait_s: float = 30.0, jitter: float = 0.5, rng=random) -> float:
    """Seconds to wait before retrying a 503: its ``Retry-After`` (seconds; 1 when absent or unreadable), capped, jittered."""
    try:
        base = float(retry_after) if retry_after is not None else 1.0
    except ValueError:  # an HTTP date, or junk: the server said "later", not when
        base = 1.0
    base = min(max(base, 0.0), max_wait_s)
    return base * (1.0 + jitter * rng.random())


def _retryable(response: httpx.Response) -> bool:
    """A 503 (shed before any work), a 408, or a 500 ``internal`` (its replica died): all safe to send again.

    Which codes those are is the registry's (``retryable`` in serve/protocol.py). A
    detserve replica drops a request's work at its deadline, which comes before the
    proxy's own timeout (``ANSWER_BEFORE_TIMEOUT_S``); so after either 408 (the replica's
    ``deadline_exceeded``, or the proxy's ``timeout`` when the answer was late on the
    way back) nothing is left running for it. A model failure would only repeat.
    """
    if response.status_code < 400:
        return False
    return _error(response).retryable


class Client:
    """Talks to one application (``app``) of a detserve server."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        app: str = "yolo",
        timeout: float = 60.0,
        *,
        retries: int = 0,
        max_wait_s: float = 30.0,
        jitter: float = 0.5,
    ):
        """``retries``: how many times a 503, a 408 or a 500 ``internal`` is retried after its ``Retry-After`` (0: never).

        Each wait is ``Retry-After`` (capped at ``max_wait_s``) times a random
        factor in ``[1, 1 + jitter]``.
        """
        self.url = f"{base_url.rstrip('/')}/{app.strip('/')}"
        self._http = httpx.Client(timeout=timeout, verify=_ssl_context())
        self.retries, self.max_wait_s, self.jitter = retries, max_wait_s, jitter
        self.retried_by_status: dict[int, int] = {}  # retries so far by the status retried, for callers that want to know

    def predict(self, *images: Any, conf: float | None = None, iou: float | None = None, max_det: int | None = None) -> Prediction:
        """Boxes for one or more images (paths, bytes, PIL images or RGB arrays), in order."""
        if not images:
            raise ValueError("give at least one image")
        params = {k: v for k, v in {"conf": conf, "iou": iou, "max_det": max_det}.items() if v is not None}
        encoded = [_to_bytes(image) for image in images]
        for attempt in range(self.retries + 1):
            if len(encoded) == 1:
                data, ctype = encoded[0]
                response = self._http.post(f"{self.url}/predict", params=params, content=data, headers={"content-type": ctype})
            else:
                files = [("file", (f"{i}", data, ctype)) for i, (data, ctype) in enumerate(encoded)]
                response = self._http.post(f"{self.url}/predict", params=params, files=files)
            if not _retryable(response) or attempt == self.retries:
                break
            self.retried_by_status[response.status_code] = self.retried_by_status.get(response.status_code, 0) + 1
            time.sleep(retry_wait_s(response.headers.get("retry-after"), self.max_wait_s, self.jitter))
        body = self._check(response)
        return Prediction(body["model"], body["results"])

    @property
    def retried(self) -> int:
        """Retries so far, of any status."""
        return sum(self.retried_by_status.values())

    def info(self) -> dict[str, Any]:
        return self._check(self._http.get(f"{self.url}/info"))

    @staticmethod
    def _check(response: httpx.Response) -> dict[str, Any]:
        if response.status_code == 200:
            return response.json()
        raise _error(response)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error(response: httpx.Response) -> DetserveError:
    """The exception of an error response: its code's class, or its status's when the body is not detserve's."""
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except Exception:  # not detserve's body (a proxy in between, a plain-text error): the status decides
        code, message = f"http_{response.status_code}", response.text[:200] or response.reason_phrase
    headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
    return error_class(code, response.status_code)(code, message, response.status_code, headers)


class ServerUnreachable(Exception):
    """No Serve proxy answered at the URL."""


@dataclass
class AppStatus:
    route: str  # "/yolo"
    name: str  # the Serve application
    info: dict[str, Any]  # GET <route>/info: model, backend, device, labels
    stats: dict[str, Any]  # GET <route>/stats: batches of the replica that answered
    error: str = ""  # why the application did not answer; "" when it did


def server_status(base_url: str = "http://127.0.0.1:8000", timeout: float = 5.0) -> list[AppStatus]:
    """Every application of a running server, read over HTTP (Serve's ``/-/routes``, then each app's /info and /stats).

    Ray's own ``serve status`` talks to the dashboard, which ``detserve serve`` leaves off.
    """
    base = base_url.rstrip("/")
    with httpx.Client(timeout=timeout) as http:
        try:
            routes = http.get(f"{base}/-/routes")
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"no detserve server answers at {base} ({type(exc).__name__}); start one with `make serve` or `detserve serve`") from exc
        if routes.status_code != 200:
            raise ServerUnreachable(f"{base}/-/routes answered {routes.status_code}: is this a Ray Serve proxy?")
        apps = []
        for route, name in sorted(routes.json().items()):
            try:
                info, stats = Client._check(http.get(f"{base}{route}/info")), Client._check(http.get(f"{base}{route}/stats"))
                apps.append(AppStatus(route, name, info, stats))
            except (httpx.HTTPError, DetserveError, ValueError) as exc:
                apps.append(AppStatus(route, name, {}, {}, error=str(exc) or type(exc).__name__))
        return apps
