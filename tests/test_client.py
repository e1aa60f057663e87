"""The HTTP client's opt-in retry: it honours Retry-After (with jitter), bounded, and gives up with the 503."""

from __future__ import annotations

import random

import httpx
import pytest

from detserve.serve.client import Client, DetserveError, retry_wait_s

OK = {"model": {"name": "m"}, "results": [{"width": 1, "height": 1, "annotations": []}]}


def test_retry_wait_follows_retry_after_capped_and_jittered():
    rng = random.Random(0)
    waits = [retry_wait_s("2", jitter=0.5, rng=rng) for _ in range(50)]
    assert all(2.0 <= w <= 3.0 for w in waits) and len({round(w, 6) for w in waits}) > 40  # spread, not in lockstep
    assert retry_wait_s("100", max_wait_s=5, jitter=0) == 5.0
    assert retry_wait_s(None, jitter=0) == 1.0 and retry_wait_s("Wed, 21 Oct 2026 07:28:00 GMT", jitter=0) == 1.0


def client_answering(statuses: list[int], monkeypatch, retries: int) -> tuple[Client, list]:
    seen, sleeps = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        status = statuses[min(len(seen), len(statuses) - 1)]
        seen.append(status)
        if status == 503:
            return httpx.Response(503, headers={"retry-after": "2"}, json={"error": {"code": "overloaded", "message": "busy"}})
        if status == 408:  # the server's own: admitted, mispredicted, dropped
            return httpx.Response(408, json={"error": {"code": "deadline_exceeded", "message": "late"}})
        if status == 4080:  # Ray's proxy timed out: plain text, the replica may still be working
            return httpx.Response(408, text="Request timed out")
        if status == 500:  # the replica died (the proxy middleware's code)
            return httpx.Response(500, json={"error": {"code": "internal", "message": "replica failed"}})
        if status == 5000:  # the model failed on this image: it would fail again
            return httpx.Response(500, json={"error": {"code": "inference_failed", "message": "bad"}})
        return httpx.Response(200, json=OK)

    monkeypatch.setattr("detserve.serve.client.time.sleep", sleeps.append)
    client = Client("http://127.0.0.1:1", retries=retries, jitter=0.0)
    client._http = httpx.Client(transport=httpx.MockTransport(handler))
    return client, sleeps


def test_a_503_is_retried_after_its_retry_after_until_it_succeeds(monkeypatch):
    client, sleeps = client_answering([503, 503, 200], monkeypatch, retries=5)
    assert client.predict(b"img").results[0]["annotations"] == []
    assert sleeps == [2.0, 2.0] and client.retried == 2


def test_retries_are_bounded_and_off_by_default(monkeypatch):
    client, sleeps = client_answering([503], monkeypatch, retries=3)
    with pytest.raises(DetserveError) as err:
        client.predict(b"img")
    assert err.value.status == 503 and err.value.code == "overloaded" and len(sleeps) == 3
    client, sleeps = client_answering([503], monkeypatch, retries=0)
    with pytest.raises(DetserveError):
        client.predict(b"img")
    assert sleeps == []


def test_other_errors_are_not_retried(monkeypatch):
    client, sleeps = client_answering([400], monkeypatch, retries=5)
    client._http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(400, json={"error": {"code": "not_an_image", "message": "x"}})))
    with pytest.raises(DetserveError, match="not_an_image"):
        client.predict(b"img")
    assert sleeps == []


def test_a_408_is_retried_whoever_timed_out(monkeypatch):
    client, sleeps = client_answering([408, 4080, 200], monkeypatch, retries=2)
    client.predict(b"img")
    assert client.retried_by_status == {408: 2} and sleeps == [1.0, 1.0]
    client, sleeps = client_answering([4080], monkeypatch, retries=1)
    with pytest.raises(DetserveError) as err:
        client.predict(b"img")
    assert err.value.status == 408 and sleeps == [1.0]


def test_a_dead_replica_is_retried_but_a_model_failure_is_not(monkeypatch):
    client, sleeps = client_answering([500, 200], monkeypatch, retries=2)
    client.predict(b"img")
    assert client.retried_by_status == {500: 1}
    client, sleeps = client_answering([5000], monkeypatch, retries=2)
    with pytest.raises(DetserveError) as err:
        client.predict(b"img")
    assert err.value.code == "inference_failed" and sleeps == []


def test_clients_share_one_tls_context():
    """A burst of clients must not each load the CA bundle (65 ms of CPU apiece here): they share one context."""
    from detserve.serve.client import Client

    with Client() as a, Client() as b:
        ctx_a = a._http._transport._pool._ssl_context
        ctx_b = b._http._transport._pool._ssl_context
    assert ctx_a is ctx_b and ctx_a.verify_mode.name == "CERT_REQUIRED"
