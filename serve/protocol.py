"""What a client of detserve sees: its header names, its error codes (status, meaning), its error body.

One registry, from which the rest is derived: every raise site builds its error
with :func:`error` (the status comes from here), the OpenAPI spec documents
:data:`ERRORS` by status, HAProxy's error files and its Lua answers use
:func:`error_body`, the Python client and the Ray handle raise the exception
class of each code's family, and docs/http-api.md's table is
:func:`markdown_error_table`.

Every error is ``{"error": {"code": "...", "message": "..."}}``: ``code`` is
stable, one per cause; ``message`` says what was sent and what to send instead.

This module imports only the standard library: the HTTP client (serve/client.py)
uses it without Ray, FastAPI or numpy.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

# ---- headers ------------------------------------------------------------------------

#: The client's deadline for one request, in seconds (see :func:`client_timeout_s`).
TIMEOUT_HEADER = "x-request-timeout-seconds"
#: Seconds to wait before retrying a 503, as HTTP defines it.
RETRY_AFTER_HEADER = "retry-after"
#: Which layer answered a refusal itself: ``replica``, ``proxy`` or ``haproxy`` on admission's 503 (serve/admission.py),
#: ``haproxy`` on the body limit's 413 when HAProxy answered it.
REFUSED_BY_HEADER = "x-detserve-refused-by"
#: Internal: a replica's admission outlook, on each /predict answer, for the ingress in front of it (stripped there).
ADMIT_HEADER = "x-detserve-admit"
#: Internal: wall-clock time the server received the request (set by the ingress; a client's own is replaced).
RECEIVED_AT_HEADER = "x-detserve-received-at"


@dataclass(frozen=True)
class Header:
    name: str
    sent_by: str  # "client", "server", or "internal" (never leaves the server)
    meaning: str


HEADERS: tuple[Header, ...] = (
    Header(TIMEOUT_HEADER, "client", "the request's deadline in seconds: a plain decimal number greater than 0 and at most "
           "the server's request timeout (30 s by default); anything else is refused with 422 `invalid_deadline`"),
    Header(RETRY_AFTER_HEADER, "server", "on a 503: whole seconds after which a retry should find room"),
    Header(REFUSED_BY_HEADER, "server", "on a 503 of detserve's admission, which layer refused: `replica`, `proxy` (the "
           "Python proxy's middleware) or `haproxy`; on a 413, `haproxy` when HAProxy refused the Content-Length "
           "without reaching a replica. A 503 without it is not detserve's rule"),
    Header(ADMIT_HEADER, "internal", "a replica's admission outlook, for the ingress in front of it"),
    Header(RECEIVED_AT_HEADER, "internal", "when the server received the request; deadlines count from it"),
)


# ---- error codes ----------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorCode:
    code: str
    status: int
    family: str  # the exception class a client raises for it (below)
    meaning: str
    retryable: bool = False  # sending the same request again later can succeed


ERRORS: tuple[ErrorCode, ...] = (
    ErrorCode("empty", 400, "BadImage", "the body, or one image, is empty"),
    ErrorCode("not_an_image", 400, "BadImage", "the bytes are not an image format detserve reads (JPEG, PNG, WebP, BMP, TIFF, GIF, AVIF)"),
    ErrorCode("corrupt_image", 400, "BadImage", "the image is truncated or corrupt"),
    ErrorCode("bad_array", 400, "BadImage", "(handle) an array that is not HxWx3, HxWx4 or HxW"),
    ErrorCode("file_not_found", 400, "BadImage", "(handle) a path with no image file at it"),
    ErrorCode("bad_json", 400, "BadRequest", "the JSON body is not valid JSON"),
    ErrorCode("bad_base64", 400, "BadRequest", "an entry of images[] is not valid base64"),
    ErrorCode("bad_multipart", 400, "BadRequest", "the multipart body cannot be parsed"),
    ErrorCode("no_images", 400, "BadRequest", "the request holds no images"),
    ErrorCode("bad_http", 400, "BadRequest", "the request is not valid HTTP (refused by HAProxy before detserve)"),
    ErrorCode("client_disconnected", 400, "BadRequest", "the connection closed before the whole body arrived (logged; nobody reads it)"),
    ErrorCode("not_found", 404, "BadRequest", "no such route (GET /-/routes lists the applications)"),
    ErrorCode("method_not_allowed", 405, "BadRequest", "the route exists, the HTTP method does not (the Allow header says which)"),
    ErrorCode("timeout", 408, "DeadlineExceeded", "the request took longer than its deadline (the client's x-request-timeout-seconds, "
              "or the server's request timeout) before the application answered", retryable=True),
    ErrorCode("deadline_exceeded", 408, "DeadlineExceeded", "admitted, but not answered by its deadline: the images not yet run "
              "were dropped", retryable=True),
    ErrorCode("body_too_large", 413, "TooLarge", "the body (or one image) is over max_body_bytes"),
    ErrorCode("too_many_images", 413, "TooLarge", "more images (multipart parts, JSON entries) than max_images"),
    ErrorCode("too_many_pixels", 413, "TooLarge", "an image has more pixels than max_pixels (read from its header, before decoding)"),
    ErrorCode("metadata_too_large", 413, "TooLarge", "an image's text metadata is over Pillow's safety limit"),
    ErrorCode("unsupported_media_type", 415, "BadRequest", "the Content-Type is not image/*, multipart/form-data or application/json"),
    ErrorCode("unsupported_type", 415, "BadImage", "(handle) an input that is not bytes, a path, a PIL image or an array"),
    ErrorCode("invalid_parameter", 422, "BadRequest", "a query parameter's value is out of range or not a number"),
    ErrorCode("unknown_parameter", 422, "BadRequest", "a query parameter /predict does not take"),
    ErrorCode("repeated_parameter", 422, "BadRequest", "a query parameter given more than once"),
    ErrorCode("bad_json_shape", 422, "BadRequest", 'the JSON body is valid JSON but not {"images": ["<base64>", ...]}'),
    ErrorCode("invalid_deadline", 422, "BadRequest", "x-request-timeout-seconds is not a number of seconds greater than 0 and "
              "at most the server's request timeout"),
    ErrorCode("prepare_failed", 422, "BadImage", "a served Dataloop adapter's prepare_item_func failed on (or returned None "
              "for) the image"),
    ErrorCode("deadline_too_short", 422, "DeadlineTooShort", "the deadline is too short for these images even on an idle server: "
              "give a longer x-request-timeout-seconds, or fewer images"),
    ErrorCode("internal", 500, "ServerError", "the server (or the replica serving the request) failed; it keeps serving",
              retryable=True),
    ErrorCode("inference_failed", 500, "ServerError", "the model failed on this image (a served adapter's predict raised, "
              "for its whole batch)"),
    ErrorCode("invalid_prediction", 500, "ServerError", "a served adapter's predict returned something other than one "
              "AnnotationCollection per image"),
    ErrorCode("overloaded", 503, "Overloaded", "the server would not answer in time now: retry after Retry-After seconds",
              retryable=True),
    ErrorCode("unavailable", 503, "Overloaded", "no replica can take the request now (starting or restarting)", retryable=True),
)

BY_CODE: dict[str, ErrorCode] = {e.code: e for e in ERRORS}
assert len(BY_CODE) == len(ERRORS), "an error code is registered twice"


def codes_by_status() -> dict[int, list[ErrorCode]]:
    by: dict[int, list[ErrorCode]] = {}
    for e in ERRORS:
        by.setdefault(e.status, []).append(e)
    return dict(sorted(by.items()))


def error_payload(code: str, message: str) -> dict:
    """The error body as a dict: ``{"error": {"code": ..., "message": ...}}``."""
    return {"error": {"code": code, "message": message}}


def error_body(code: str, message: str) -> bytes:
    """The error body as JSON bytes: the one way every part of detserve writes it (HAProxy's files included)."""
    return json.dumps(error_payload(code, message)).encode()


def asgi_messages(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> list[dict]:
    """The ASGI messages (start, body) of an error response: how a middleware answers in the contract."""
    body = error_body(code, message)
    fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    fields += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in (headers or {}).items()]
    return [{"type": "http.response.start", "status": status, "headers": fields}, {"type": "http.response.body", "body": body}]


# ---- the exceptions: raised by the server's code, the Ray handle and the HTTP client alike ----


class DetserveError(ValueError):
    """An error of detserve's contract: ``status``, ``code`` (stable), ``message`` (what to change).

    A ``ValueError``, as the Ray handle's errors have always been. Subclasses, one per family of codes,
    let a caller catch what it can act on: :class:`BadRequest` (and :class:`BadImage`,
    :class:`TooLarge`, :class:`DeadlineTooShort`), :class:`DeadlineExceeded`, :class:`Overloaded`,
    :class:`ServerError`.
    """

    def __init__(self, code: str, message: str, status: int | None = None, headers: dict[str, str] | None = None):
        known = BY_CODE.get(code)
        self.status = status if status is not None else (known.status if known else 500)
        self.code, self.message, self.headers = code, message, dict(headers or {})
        super().__init__(f"{self.status} {code}: {message}")

    def __reduce__(self):  # pickled by Ray between the replica and a handle's caller
        return (type(self), (self.code, self.message, self.status, self.headers))

    def asgi_messages(self) -> list[dict]:
        return asgi_messages(self.status, self.code, self.message, self.headers)

    @property
    def retryable(self) -> bool:
        """Sending the same request again later can succeed (a 503, a 408, a replica that died)."""
        known = BY_CODE.get(self.code)
        return known.retryable if known else self.status in (408, 503)

    @property
    def retry_after_s(self) -> float | None:
        """The server's Retry-After in seconds, when it gave one as a number."""
        value = {k.lower(): v for k, v in self.headers.items()}.get(RETRY_AFTER_HEADER)
        try:
            seconds = float(value) if value is not None else math.nan
        except ValueError:
            return None
        return seconds if math.isfinite(seconds) and seconds >= 0 else None


class BadRequest(DetserveError):
    """The request is wrong (a 4xx): change it before sending it again."""


class BadImage(BadRequest):
    """An image that cannot be read: empty, not an image, truncated or corrupt."""


class TooLarge(BadRequest):
    """Over a limit (a 413): fewer or smaller images per request."""


class DeadlineTooShort(BadRequest):
    """A deadline nothing could meet (a 422): a longer x-request-timeout-seconds, or fewer images."""


class DeadlineExceeded(DetserveError):
    """Admitted but not answered by its deadline (a 408); nothing is left running for it: safe to retry."""


class Overloaded(DetserveError):
    """The server cannot take the request now (a 503): retry after :attr:`retry_after_s`."""


class ServerError(DetserveError):
    """The server failed (a 500)."""


FAMILIES: dict[str, type[DetserveError]] = {
    cls.__name__: cls for cls in (BadRequest, BadImage, TooLarge, DeadlineTooShort, DeadlineExceeded, Overloaded, ServerError)
}
assert {e.family for e in ERRORS} <= set(FAMILIES), "an error code names a family with no exception class"


def error_class(code: str, status: int) -> type[DetserveError]:
    """The exception class of ``code``; a code the registry does not know gets its status's class."""
    known = BY_CODE.get(code)
    if known:
        return FAMILIES[known.family]
    if status == 413:
        return TooLarge
    if status == 408:
        return DeadlineExceeded
    if status in (429, 503):
        return Overloaded
    if 400 <= status < 500:
        return BadRequest
    return ServerError if status >= 500 else DetserveError


def error(code: str, message: str, headers: dict[str, str] | None = None, status: int | None = None) -> DetserveError:
    """The exception for ``code`` (its family's class, its registered status): what every raise site raises."""
    if status is None and code not in BY_CODE:
        raise KeyError(f"error code {code!r} is not in serve/protocol.py's ERRORS: register it (status, family, meaning)")
    return error_class(code, status or BY_CODE[code].status)(code, message, status, headers)


# ---- the client's deadline header -----------------------------------------------------------

#: A plain decimal number: digits, optionally a fraction ("2", "0.5", "30.0", ".5"); no sign, exponent, "nan" or "inf".
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")
#: What :func:`client_timeout_s` accepts, in Lua's pattern syntax, for HAProxy's admission (one of the two matches).
LUA_DECIMAL_PATTERNS = ("^%d+%.?%d*$", "^%.%d+$")


def client_timeout_s(value: str | bytes | float | int | None, max_s: float, name: str = TIMEOUT_HEADER) -> float | None:
    """The client's deadline (``x-request-timeout-seconds``, or the handle's ``timeout_s``) in seconds; None when absent.

    Accepted: a finite number greater than 0 and at most ``max_s`` (the server's request timeout: the server
    answers within it whatever the client asks); a header's text must be a plain decimal number. Anything else
    raises :class:`BadRequest` ``invalid_deadline``, whose message quotes what was sent and says what is
    accepted. The one check, for every place that reads a client's deadline.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    plain = True
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "..."
        plain = _DECIMAL.match(value) is not None
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        shown, seconds = f"{value:g}", float(value)
    else:
        shown, seconds = repr(value), math.nan
    if plain and math.isfinite(seconds) and 0 < seconds <= max_s:
        return seconds
    if not math.isfinite(seconds):
        problem = "is not a number of seconds"
    elif seconds <= 0:
        problem = "is not greater than 0"
    elif seconds > max_s:
        problem = f"is more than this server's request timeout of {max_s:g} s, which bounds every request"
    else:
        problem = "is not written as a plain decimal number"
    example = f"{name}: {min(10.0, max_s):g}" if name == TIMEOUT_HEADER else f"{name}={min(10.0, max_s):g}"
    raise error("invalid_deadline", f"{name}: {shown} {problem}: send a plain decimal number of seconds greater than 0 "
                f"and at most {max_s:g} (e.g. {example}), or leave it out for {max_s:g} s")  # fmt: skip


# ---- messages several places give -------------------------------------------------------------

#: Every refusal that admission gives in front of the app (a middleware, HAProxy) says so, for clients and benchmarks.
REFUSED_AT_INGRESS = "refused at the ingress, before the app"


def overloaded_message(why: str, retry_after: str) -> str:
    """The 503 ``overloaded`` message, whoever refuses: why (the replica's prediction, or the ingress's
    "every replica's queue is full ... (refused at the ingress, before the app)"), and when to come back."""
    return (f"the server is busy: {why}. Retry after {retry_after} s (the Retry-After header), "
            "or send fewer images per request")


#: Why the ingress (the Python proxy's middleware, HAProxy's Lua) refuses, in :func:`overloaded_message`.
INGRESS_REFUSAL = f"every replica's queue is full for a request arriving now ({REFUSED_AT_INGRESS})"


_LUA_PRELUDE = r"""-- Generated by detserve.serve.protocol.lua_prelude(): the registry's constants for HAProxy's Lua.
detserve = detserve or {}
detserve.status = {STATUSES}
detserve.timeout_header = TIMEOUT_HEADER
detserve.refused_by_header = REFUSED_BY_HEADER
detserve.refused_at_ingress = REFUSED_AT_INGRESS
detserve.overloaded_format = OVERLOADED_FORMAT
detserve.ingress_refusal = INGRESS_REFUSAL
detserve.decimal_patterns = {DECIMAL_PATTERNS}

local function json_string(text)
    local escaped = string.gsub(text, '[%c"\\]', function(c)
        if c == '"' then return '\\"' end
        if c == '\\' then return '\\\\' end
        return string.format('\\u%04x', string.byte(c))
    end)
    return '"' .. escaped .. '"'
end

-- The error body, as detserve.serve.protocol.error_body writes it.
function detserve.error_body(code, message)
    return '{"error": {"code": ' .. json_string(code) .. ', "message": ' .. json_string(message) .. '}}'
end
"""


def lua_prelude() -> str:
    """Lua source for HAProxy (put before serve/haproxy_admission.lua): the registry's constants and body builder.

    ``detserve.error_body(code, message)`` writes the JSON body as :func:`error_body` does; ``detserve.status``
    holds each code's status; ``detserve.overloaded_format`` is :func:`overloaded_message`'s text as a
    ``string.format`` pattern of two arguments, why then Retry-After; ``detserve.ingress_refusal`` is the why
    of a refusal at the ingress.
    """
    template = overloaded_message("WHY", "RETRY").replace("%", "%%").replace("WHY", "%s", 1).replace("RETRY", "%s", 1)
    values = {
        "{STATUSES}": "{" + ", ".join(f"{e.code} = {e.status}" for e in ERRORS) + "}",
        "{DECIMAL_PATTERNS}": "{" + ", ".join(json.dumps(p) for p in LUA_DECIMAL_PATTERNS) + "}",
        "TIMEOUT_HEADER": json.dumps(TIMEOUT_HEADER),
        "REFUSED_BY_HEADER": json.dumps(REFUSED_BY_HEADER),
        "REFUSED_AT_INGRESS": json.dumps(REFUSED_AT_INGRESS),
        "OVERLOADED_FORMAT": json.dumps(template),
        "INGRESS_REFUSAL": json.dumps(INGRESS_REFUSAL),
    }
    text = _LUA_PRELUDE
    for key, value in values.items():
        text = text.replace(key, value, 1)
    return text


def markdown_error_table() -> str:
    """Every error code as a markdown table (status, code, exception class, retry, meaning), for docs/http-api.md."""
    rows = ["| status | code | client exception | retry? | meaning |", "|---|---|---|---|---|"]
    for e in ERRORS:
        rows.append(f"| {e.status} | `{e.code}` | `{e.family}` | {'yes' if e.retryable else 'no'} | {e.meaning.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def markdown_header_table() -> str:
    """The headers a client sends or sees (the internal ones never reach it) as a markdown table, for docs/http-api.md."""
    rows = ["| header | sent by | meaning |", "|---|---|---|"]
    rows += [f"| `{h.name}` | {h.sent_by} | {h.meaning} |" for h in HEADERS if h.sent_by != "internal"]
    return "\n".join(rows) + "\n"
