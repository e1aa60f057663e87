"""serve/protocol.py: one registry of error codes and headers, from which the spec, the client and the docs derive."""

from __future__ import annotations

import ast
import json
import pickle
import re
from pathlib import Path

import httpx
import pytest

from detserve.serve import protocol
from detserve.serve.protocol import BY_CODE, ERRORS

ROOT = Path(__file__).resolve().parent.parent


#: Functions that return (code, message) for their caller to raise.
_CODE_RETURNING = {"error_for", "too_large"}


def _raised_codes() -> set[str]:
    """Every literal error code the raise sites of serve/ and runtime/images.py name: ``error("code", ...)``,
    ``ImageError("code", ...)``, and ``return "code", message`` in the functions of ``_CODE_RETURNING``."""
    codes = set()
    for path in [*ROOT.glob("serve/*.py"), ROOT / "runtime" / "images.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("error", "ImageError"):
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    codes.add(first.value)
            if isinstance(node, ast.FunctionDef) and node.name in _CODE_RETURNING:
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Tuple):
                        first = ret.value.elts[0]
                        if isinstance(first, ast.Constant) and isinstance(first.value, str):
                            codes.add(first.value)
    return codes


def test_every_code_a_raise_site_names_is_registered():
    from detserve.serve.http import IMAGE_CODE

    raised = {IMAGE_CODE.get(code, code) for code in _raised_codes()}
    # The scan must see the raise sites (one that finds nothing proves nothing), among them the codes ERRORS once lacked.
    assert {"too_many_images", "body_too_large", "not_an_image", "timeout", "overloaded", "deadline_exceeded",
            "deadline_too_short", "client_disconnected", "invalid_deadline"} <= raised, raised  # fmt: skip
    assert raised <= set(BY_CODE), raised - set(BY_CODE)


def test_one_code_one_status_and_every_family_has_a_class():
    assert len({e.code for e in ERRORS}) == len(ERRORS)
    for e in ERRORS:
        exc = protocol.error(e.code, "m")
        assert exc.status == e.status and type(exc).__name__ == e.family and isinstance(exc, protocol.DetserveError)
        assert isinstance(exc, ValueError)  # as the Ray handle's errors always were
        assert e.meaning and re.fullmatch(r"[a-z0-9_]+", e.code)
    with pytest.raises(KeyError, match="register it"):
        protocol.error("no_such_code", "m")


def test_the_families_nest_as_a_caller_catches_them():
    assert issubclass(protocol.BadImage, protocol.BadRequest) and issubclass(protocol.TooLarge, protocol.BadRequest)
    assert issubclass(protocol.DeadlineTooShort, protocol.BadRequest)
    assert not issubclass(protocol.DeadlineExceeded, protocol.BadRequest) and not issubclass(protocol.Overloaded, protocol.BadRequest)
    assert {e.code for e in ERRORS if e.retryable} == {"timeout", "deadline_exceeded", "internal", "overloaded", "unavailable"}


def test_an_error_survives_pickling_as_ray_sends_it_to_a_handles_caller():
    exc = protocol.error("overloaded", "busy", {"Retry-After": "3"})
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is protocol.Overloaded and (back.status, back.code, back.message) == (503, "overloaded", "busy")
    assert back.retry_after_s == 3.0 and str(back) == str(exc)


def test_the_error_body_is_the_contracts():
    assert json.loads(protocol.error_body("not_found", 'a "b"\n')) == {"error": {"code": "not_found", "message": 'a "b"\n'}}
    start, body = protocol.asgi_messages(413, "body_too_large", "m", {"Connection": "close"})
    assert start["status"] == 413 and dict(start["headers"])[b"connection"] == b"close"
    assert dict(start["headers"])[b"content-length"] == str(len(body["body"])).encode()


def test_the_openapi_spec_documents_every_code_a_client_can_get(local_client):
    spec = local_client.get("/openapi.json").json()
    described = " ".join(response.get("description", "") for path in spec["paths"].values() for op in path.values()
                         for response in op["responses"].values())  # fmt: skip
    missing = [e.code for e in ERRORS if f"`{e.code}`" not in described]
    assert not missing, missing
    post = spec["paths"]["/predict"]["post"]["responses"]
    assert {"404", "405"} <= set(post) and {"404", "405"} <= set(spec["paths"]["/info"]["get"]["responses"])


@pytest.mark.parametrize("code", [e.code for e in ERRORS])
def test_the_client_raises_each_codes_own_class(code):
    from detserve.serve.client import Client

    status = BY_CODE[code].status
    answer = httpx.Response(status, json={"error": {"code": code, "message": "m"}}, headers={"retry-after": "2"})
    with pytest.raises(protocol.DetserveError) as err:
        Client._check(answer)
    assert type(err.value).__name__ == BY_CODE[code].family and (err.value.status, err.value.code) == (status, code)
    assert err.value.retryable == BY_CODE[code].retryable


def test_an_error_without_detserves_body_gets_its_statuss_class():
    from detserve.serve.client import Client

    for status, cls in ((408, protocol.DeadlineExceeded), (413, protocol.TooLarge), (503, protocol.Overloaded),
                        (429, protocol.Overloaded), (418, protocol.BadRequest), (502, protocol.ServerError)):  # fmt: skip
        with pytest.raises(cls) as err:
            Client._check(httpx.Response(status, text="plain"))
        assert err.value.code == f"http_{status}"


def test_the_markdown_table_lists_every_code_once():
    table = protocol.markdown_error_table()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == len(ERRORS)
    for e in ERRORS:
        assert sum(f"| `{e.code}` |" in row for row in rows) == 1, e.code


@pytest.mark.parametrize(
    "sent,problem",
    [("0", "is not greater than 0"), ("-1", "is not greater than 0"), ("abc", "is not a number"), ("nan", "is not a number"),
     ("inf", "is not a number"), ("1e9", "is more than this server's request timeout of 30 s"), ("1e1", "plain decimal"),
     ("31", "is more than"), (" 5", "plain decimal"), ("", "is not a number")],
)  # fmt: skip
def test_every_unusable_deadline_is_refused_naming_the_header_and_what_was_sent(sent, problem):
    with pytest.raises(protocol.BadRequest) as err:
        protocol.client_timeout_s(sent, 30.0)
    assert err.value.code == "invalid_deadline" and err.value.status == 422
    assert err.value.message.startswith(f"{protocol.TIMEOUT_HEADER}: {sent} ") and problem in err.value.message
    assert "greater than 0 and at most 30" in err.value.message


def test_a_usable_deadline_is_used():
    assert protocol.client_timeout_s(None, 30) is None
    assert protocol.client_timeout_s("0.001", 30) == 0.001 and protocol.client_timeout_s(b"30", 30) == 30.0
    assert protocol.client_timeout_s(".5", 30) == 0.5 and protocol.client_timeout_s(2, 30) == 2.0
    with pytest.raises(protocol.BadRequest, match="timeout_s: nan is not a number"):
        protocol.client_timeout_s(float("nan"), 30, name="timeout_s")


def test_the_http_api_doc_carries_the_registrys_tables_as_they_are():
    doc = (ROOT / "docs" / "http-api.md").read_text()
    assert protocol.markdown_error_table() in doc, "docs/http-api.md: paste protocol.markdown_error_table() again"
    assert protocol.markdown_header_table() in doc, "docs/http-api.md: paste protocol.markdown_header_table() again"
