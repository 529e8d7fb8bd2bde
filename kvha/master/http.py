"""The REST Web API on a master's HTTP port, plus ``/health`` and ``/metrics``.

Routes (``docs/openapi.yaml`` describes them in full)::

    GET    /v1/p/{partition}/k/{key}       read a value
    PUT    /v1/p/{partition}/k/{key}       store a value (If-Match / If-None-Match: *)
    POST   /v1/p/{partition}/k/{key}       create a value; 409 if the key exists
    DELETE /v1/p/{partition}/k/{key}       delete (If-Match makes it conditional)
    POST   /v1/p/{partition}/mget          read many: {"keys": [...]}
    GET    /v1/p/{partition}/k?prefix=&limit=&cursor=   list keys
    GET    /health                         200 while data can be served, else 503
    GET    /metrics                        Prometheus text

Keys are path segments, percent-decoded to bytes (write ``/`` as ``%2F``).
Replies are JSON, XML or raw bytes by ``Accept``; the ``ETag`` is the
record's version, so ``If-Match`` is an optimistic lock.  Errors are small
JSON or XML documents with a stable numeric ``code``.  CORS preflights are
answered for the configured origins so that pages on other origins can call
the API with ``fetch()``.

A partition that does not allow anonymous access needs ``Authorization:
Bearer <password>`` on every request: without one the answer is 401, with a
token that does not open the partition 403.  Checking a token is paid once
(then remembered, see :mod:`kvha.master.auth`), so each request costs an HMAC.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any, Callable, Optional, cast
from urllib.parse import parse_qs, unquote_to_bytes
from xml.sax.saxutils import escape, quoteattr

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource
from twisted.web.server import Request

from kvha.data.store import Status, StoreMode
from kvha.master.auth import Authenticator, TooManyFailures, peer_host
from kvha.master.limits import ConnectionBudget
from kvha.master.router import LOADING_WHY, RETRYABLE, OutOfSpace, Router, Unavailable
from kvha.record import Record

log = Logger()

JSON = b"application/json"
XML = b"application/xml"
RAW = b"application/octet-stream"
METHODS = b"GET, PUT, POST, DELETE, OPTIONS"
ALLOWED_HEADERS = b"Content-Type, Accept, If-Match, If-None-Match, Authorization"
MAX_TTL = 10 * 365 * 86400

# Characters XML 1.0 cannot carry at all, even as character references.
_XML_BAD = (set(range(0, 32)) - {9, 10, 13}) | {0xFFFE, 0xFFFF}
_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
    507: "insufficient_storage",
}


class HttpError(Exception):
    def __init__(self, code: int, message: str, allow: Optional[bytes] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.allow = allow


def _text(data: bytes) -> Optional[str]:
    """The value as text when it is valid UTF-8 that XML can carry, else None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ord(c) in _XML_BAD for c in text):
        return None
    return text


def _xml_text(text: str) -> str:
    """Escape element content; a literal CR would be read back as LF."""
    return escape(text, {"\r": "&#13;"})


def _encoded(data: bytes) -> tuple[str, str]:
    """``(encoding, text)``: utf-8 when possible, base64 otherwise."""
    text = _text(data)
    if text is not None:
        return "utf-8", text
    return "base64", base64.b64encode(data).decode("ascii")


def negotiate(accept: Optional[bytes], allow_raw: bool) -> bytes:
    """Pick JSON, XML or raw bytes from an Accept header (JSON by default)."""
    if not accept:
        return JSON
    offers = [JSON, XML] + ([RAW] if allow_raw else [])
    best: Optional[bytes] = None
    best_q = 0.0
    for item in accept.split(b","):
        parts = [p.strip() for p in item.split(b";")]
        mtype = parts[0].lower()
        q = 1.0
        for param in parts[1:]:
            if param.startswith(b"q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if mtype in (b"*/*", b"application/*"):
            match: Optional[bytes] = JSON
        elif mtype in (b"text/xml",):
            match = XML
        else:
            match = mtype if mtype in offers else None
        if match is not None and q > best_q:
            best, best_q = match, q
    if best is None:
        raise HttpError(
            406,
            "none of the accepted media types is available: "
            "application/json, application/xml"
            + (", application/octet-stream" if allow_raw else ""),
        )
    return best


def record_doc(partition: bytes, key: bytes, record: Record) -> dict[str, Any]:
    encoding, value = _encoded(record.value)
    key_encoding, key_text = _encoded(key)
    doc: dict[str, Any] = {
        "partition": partition.decode(),
        "key": key_text,
        "value": value,
        "encoding": encoding,
        "version": str(record.version),
        "flags": record.flags,
        "expires": record.expires_ms / 1000.0 if record.expires_ms else None,
    }
    if key_encoding != "utf-8":
        doc["key_encoding"] = key_encoding
    return doc


def record_xml(doc: dict[str, Any]) -> str:
    attrs = " ".join(
        f"{name}={quoteattr(str(doc[name]))}"
        for name in ("partition", "key", "key_encoding", "version", "flags", "expires", "encoding")
        if doc.get(name) is not None
    )
    return f"<record {attrs}>{_xml_text(doc['value'])}</record>"


class Api(Resource):
    """The whole HTTP surface as one leaf resource, routed by hand."""

    isLeaf = True

    def __init__(
        self,
        router: Router,
        clock: IReactorTime,
        cors_origins: Sequence[str] = (),
        max_value_bytes: int = 1 << 20,
        max_list: int = 1000,
        metrics: Optional[Callable[[], bytes]] = None,
        authenticator: Optional[Authenticator] = None,
    ) -> None:
        super().__init__()
        self.router = router
        self.authenticator = authenticator if authenticator is not None else Authenticator(router)
        self.clock = clock
        self.cors_origins = {o.encode() for o in cors_origins}
        self.max_value_bytes = max_value_bytes
        self.max_list = max_list
        self.metrics = metrics
        self.requests = 0
        self.errors: dict[int, int] = {}

    # Plumbing -------------------------------------------------------------------

    def render(self, request: Request) -> Any:
        self.requests += 1
        self._cors(request)
        fmt = JSON
        try:
            # /health, /metrics and preflights have fixed media types: no 406 there.
            if request.method != b"OPTIONS" and request.path not in (b"/health", b"/metrics"):
                fmt = negotiate(request.getHeader(b"accept"), allow_raw=True)
            result = self._route(request, fmt)
        except HttpError as e:
            return self._error(request, e, fmt)
        if isinstance(result, Deferred):
            result.addErrback(self._failed, request, fmt)
            result.addCallback(self._finish, request)
            return server.NOT_DONE_YET
        return result

    def _finish(self, body: bytes, request: Request) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.write(body)
        request.finish()

    def _failed(self, failure: Any, request: Request, fmt: bytes) -> bytes:
        if failure.check(HttpError):
            return self._error(request, failure.value, fmt)
        if failure.check(OutOfSpace):
            return self._error(request, HttpError(507, "the partition is full"), fmt)
        if failure.check(Unavailable, *RETRYABLE):  # a copy failed or timed out: no traceback
            return self._error(request, HttpError(503, failure.getErrorMessage()), fmt)
        if failure.check(ValueError):
            return self._error(request, HttpError(413, failure.getErrorMessage()), fmt)
        log.failure("HTTP request failed", failure)
        return self._error(request, HttpError(503, failure.getErrorMessage()), fmt)

    def _cors(self, request: Request) -> None:
        origin = request.getHeader(b"origin")
        if origin is None or not self.cors_origins:
            return
        if b"*" in self.cors_origins:
            request.setHeader("Access-Control-Allow-Origin", b"*")
        elif (
            origin.encode() in self.cors_origins
            if isinstance(origin, str)
            else origin in self.cors_origins
        ):
            request.setHeader("Access-Control-Allow-Origin", origin)
            request.setHeader("Vary", b"Origin")
        else:
            return
        request.setHeader("Access-Control-Expose-Headers", b"ETag, Location, X-Kvha-Flags")

    def _error(self, request: Request, e: HttpError, fmt: bytes) -> bytes:
        self.errors[e.code] = self.errors.get(e.code, 0) + 1
        request.setResponseCode(e.code)
        if e.allow is not None:
            request.setHeader("Allow", e.allow)
        reason = _REASONS.get(e.code, "error")
        if fmt == XML:
            request.setHeader("Content-Type", b"application/xml; charset=utf-8")
            return (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<error code="{e.code}" '
                f"status={quoteattr(reason)}>{_xml_text(e.message)}</error>\n"
            ).encode()
        request.setHeader("Content-Type", b"application/json")
        return json.dumps(
            {"error": {"code": e.code, "status": reason, "message": e.message}}
        ).encode()

    def _reply(self, request: Request, fmt: bytes, doc: Any, xml: Callable[[Any], str]) -> bytes:
        if fmt == XML:
            request.setHeader("Content-Type", b"application/xml; charset=utf-8")
            return ('<?xml version="1.0" encoding="UTF-8"?>\n' + xml(doc) + "\n").encode()
        request.setHeader("Content-Type", b"application/json")
        return json.dumps(doc).encode()

    # Routing --------------------------------------------------------------------

    def _route(self, request: Request, fmt: bytes) -> Any:
        path = request.path.split(b"?", 1)[0]
        segments = path.split(b"/")[1:]
        method = request.method
        if method == b"OPTIONS":
            return self._preflight(request)
        if segments == [b"health"]:
            self._only(method, b"GET, HEAD")
            return self._health(request)
        if segments == [b"metrics"]:
            self._only(method, b"GET, HEAD")
            request.setHeader("Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
            return self.metrics() if self.metrics is not None else b""
        if len(segments) >= 3 and segments[0] == b"v1" and segments[1] == b"p":
            if self.router.loading:
                request.setHeader("Retry-After", b"1")
                raise HttpError(503, f"kvha is starting: {LOADING_WHY}")
            partition = unquote_to_bytes(segments[2])
            if partition not in self.router.policies:
                raise HttpError(404, f"unknown partition {partition.decode(errors='replace')!r}")
            rest = segments[3:]
            waiting = self._authorize(request, partition)
            if waiting is not None:
                return waiting.addCallback(
                    lambda _: self._in_partition(request, fmt, method, partition, rest)
                )
            return self._in_partition(request, fmt, method, partition, rest)
        raise HttpError(404, f"no such resource: {path.decode(errors='replace')}")

    def _authorize(self, request: Request, partition: bytes) -> Optional[Deferred]:
        """Raise 401/403 unless the request may use ``partition``; a Deferred while checking."""
        header = request.getHeader(b"authorization")
        if header is None:
            if self.authenticator.anonymous(partition):
                return None
            request.setHeader("WWW-Authenticate", b'Bearer realm="kvha"')
            raise HttpError(
                401, "this partition needs a bearer token: Authorization: Bearer <password>"
            )
        scheme, _, token = header.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            request.setHeader("WWW-Authenticate", b'Bearer realm="kvha", error="invalid_request"')
            raise HttpError(401, "expected Authorization: Bearer <password>")

        def decide(ok: bool) -> None:
            if not ok:
                log.warn(
                    "HTTP client {peer}: bearer token refused for partition {partition}",
                    peer=request.getClientAddress(),
                    partition=partition.decode("utf-8", "replace")[:64],
                )
                raise HttpError(403, "the bearer token does not open this partition")

        try:
            answer = self.authenticator.check(
                partition, token, peer_host(request.getClientAddress())
            )
        except TooManyFailures as e:
            log.warn(
                "HTTP client {peer}: bearer token not checked: {why}",
                peer=request.getClientAddress(),
                why=str(e),
            )
            request.setHeader("Retry-After", str(e.retry_after).encode())
            raise HttpError(429, str(e)) from None
        if isinstance(answer, Deferred):
            return answer.addCallback(decide)
        decide(answer)
        return None

    def _in_partition(
        self, request: Request, fmt: bytes, method: bytes, partition: bytes, rest: list[bytes]
    ) -> Any:
        if rest == [b"mget"]:
            self._only(method, b"POST, OPTIONS")
            return self._mget(request, fmt, partition)
        if rest == [b"k"] or (rest == [b"k", b""] and method in (b"GET", b"HEAD")):
            self._only(method, b"GET, OPTIONS")
            return self._list(request, fmt, partition)
        if len(rest) == 2 and rest[0] == b"k":
            key = unquote_to_bytes(rest[1])
            if not key:
                raise HttpError(400, "the key is empty")
            if method in (b"GET", b"HEAD"):
                return self._get(request, fmt, partition, key)
            if method == b"PUT":
                return self._put(request, fmt, partition, key, create_only=False)
            if method == b"POST":
                return self._put(request, fmt, partition, key, create_only=True)
            if method == b"DELETE":
                return self._delete(request, fmt, partition, key)
            raise HttpError(405, f"method {method.decode()} is not allowed here", METHODS)
        path = request.path.split(b"?", 1)[0]
        raise HttpError(404, f"no such resource: {path.decode(errors='replace')}")

    def _only(self, method: bytes, allowed: bytes) -> None:
        if method not in [m.strip() for m in allowed.split(b",")]:
            raise HttpError(405, f"method {method.decode()} is not allowed here", allowed)

    def _preflight(self, request: Request) -> bytes:
        request.setResponseCode(204)
        if request.getHeader(b"origin") is not None and self.cors_origins:
            request.setHeader("Access-Control-Allow-Methods", METHODS)
            request.setHeader("Access-Control-Allow-Headers", ALLOWED_HEADERS)
            request.setHeader("Access-Control-Max-Age", b"600")
        request.setHeader("Allow", METHODS)
        return b""

    def _health(self, request: Request) -> bytes:
        links = self.router.links.values()
        ok = self.router.serving(quorum=False) and not self.router.loading
        request.setResponseCode(200 if ok else 503)
        if self.router.loading:
            request.setHeader("Retry-After", b"1")
        request.setHeader("Content-Type", b"application/json")
        return json.dumps(
            {
                "status": "ok" if ok else "loading" if self.router.loading else "unavailable",
                "data_nodes": {link.node_id: link.state for link in links},
            }
        ).encode()

    # Keys -----------------------------------------------------------------------

    def _etag(self, request: Request, record: Record) -> None:
        request.setHeader("ETag", f'"{record.version}"'.encode())

    def _get(self, request: Request, fmt: bytes, partition: bytes, key: bytes) -> Deferred:
        def render(record: Optional[Record]) -> bytes:
            if record is None:
                raise HttpError(404, "no such key")
            self._etag(request, record)
            if fmt == RAW:
                request.setHeader("Content-Type", RAW)
                request.setHeader("X-Kvha-Flags", str(record.flags).encode())
                return record.value
            return self._reply(request, fmt, record_doc(partition, key, record), record_xml)

        return self.router.get(partition, key).addCallback(render)

    def _body(self, request: Request) -> tuple[bytes, int, Optional[int]]:
        """``(value, flags, ttl)`` from a PUT body, raw or JSON."""
        length = request.getHeader(b"content-length")
        limit = self.max_value_bytes
        ctype = (
            (request.getHeader(b"content-type") or b"application/octet-stream")
            .split(b";")[0]
            .strip()
            .lower()
            .decode("latin-1")
        )
        json_limit = limit * 4 // 3 + 64 * 1024
        if (
            length is not None
            and length.isdigit()
            and int(length) > (json_limit if ctype == "application/json" else limit)
        ):
            raise HttpError(413, f"the value exceeds {limit} bytes")
        body = request.content.read() if request.content is not None else b""
        flags = 0
        ttl: Optional[int] = None
        if ctype == "application/json":
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise HttpError(400, f"the body is not valid JSON: {e}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("value"), str):
                raise HttpError(400, 'a JSON body must be an object with a string "value"')
            encoding = doc.get("encoding", "utf-8")
            if encoding == "base64":
                try:
                    value = base64.b64decode(doc["value"], validate=True)
                except (binascii.Error, ValueError):
                    raise HttpError(400, "value is not valid base64") from None
            elif encoding == "utf-8":
                value = doc["value"].encode("utf-8")
            else:
                raise HttpError(400, 'encoding must be "utf-8" or "base64"')
            f = doc.get("flags", 0)
            if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < 1 << 32:
                raise HttpError(400, "flags must be an integer from 0 to 4294967295")
            flags = f
            if doc.get("ttl") is not None:
                t = doc["ttl"]
                if not isinstance(t, int) or isinstance(t, bool) or not 0 < t <= MAX_TTL:
                    raise HttpError(400, f"ttl must be an integer from 1 to {MAX_TTL} seconds")
                ttl = t
        elif ctype in (
            "application/octet-stream",
            "application/x-www-form-urlencoded",  # what `curl -d` sends
        ) or ctype.startswith("text/"):
            value = body
        else:
            raise HttpError(
                415,
                f"unsupported Content-Type {ctype!r}; send application/octet-stream, "
                "text/*, application/x-www-form-urlencoded (raw bytes) or application/json",
            )
        if len(value) > limit:
            raise HttpError(413, f"the value exceeds {limit} bytes")
        return value, flags, ttl

    def _ttl_arg(self, request: Request) -> Optional[int]:
        # From the query string only: for a form-encoded POST (``curl -d``),
        # twisted.web merges the body into request.args, and the body is the value.
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        raw = parse_qs(query, keep_blank_values=True).get(b"ttl")
        if not raw:
            return None
        token = raw[0]
        if not token.isdigit() or not 0 < int(token) <= MAX_TTL:
            raise HttpError(400, f"ttl must be an integer from 1 to {MAX_TTL} seconds")
        return int(token)

    def _put(
        self, request: Request, fmt: bytes, partition: bytes, key: bytes, create_only: bool
    ) -> Deferred:
        value, flags, body_ttl = self._body(request)
        ttl = self._ttl_arg(request)
        ttl = ttl if ttl is not None else body_ttl
        expires = int(self.clock.seconds() * 1000) + ttl * 1000 if ttl else 0
        if_match = request.getHeader(b"if-match")
        if_none = request.getHeader(b"if-none-match")
        router = self.router
        if if_match is not None and (create_only or if_none is not None):
            raise HttpError(400, "If-Match cannot be combined with create-only writes")
        if if_none is not None and if_none.strip() != b"*":
            raise HttpError(400, "only If-None-Match: * is supported on writes")

        def done(result: Any, created: Optional[bool] = None) -> bytes:
            record = result.record
            if record is not None:
                self._etag(request, record)
            request.setResponseCode(201 if created else 200)
            doc = record_doc(partition, key, record) if record is not None else {}
            return self._reply(request, fmt if fmt != RAW else JSON, doc, record_xml)

        if if_match is not None:
            versions = _etags(if_match)

            def conditional(record: Optional[Record]) -> Any:
                if record is None:
                    raise HttpError(412, "the key does not exist (If-Match)")
                if versions is not None and record.version not in versions:
                    raise HttpError(412, "the key has changed (If-Match does not match)")
                cas = record.version
                op = lambda c: c.store(  # noqa: E731
                    StoreMode.CAS, partition, key, value, flags, expires, cas
                )
                return router.conditional(partition, key, op).addCallback(check_cas)

            def check_cas(result: Any) -> bytes:
                if result.status is Status.STORED:
                    return done(result)
                if result.status is Status.TOO_LARGE:
                    raise HttpError(413, "the value is too large")
                raise HttpError(412, "the key changed during the write (If-Match)")

            return router.get(partition, key).addCallback(conditional)

        if create_only or if_none is not None:
            code = 409 if create_only else 412

            def created(result: Any) -> bytes:
                if result.status is Status.STORED:
                    return done(result, created=True)
                if result.status is Status.TOO_LARGE:
                    raise HttpError(413, "the value is too large")
                raise HttpError(code, "the key already exists")

            op = lambda c: c.store(StoreMode.CAS, partition, key, value, flags, expires, 0)  # noqa: E731
            return router.conditional(partition, key, op).addCallback(created)

        return router.set(partition, key, value, flags, expires).addCallback(done)

    def _delete(self, request: Request, fmt: bytes, partition: bytes, key: bytes) -> Deferred:
        if_match = request.getHeader(b"if-match")
        router = self.router

        def done(result: Any) -> bytes:
            if result.status is not Status.DELETED:
                raise HttpError(404, "no such key")
            request.setResponseCode(204)
            return b""

        if if_match is None:
            return router.delete(partition, key).addCallback(done)
        versions = _etags(if_match)

        def conditional(record: Optional[Record]) -> Any:
            if record is None:
                raise HttpError(412, "the key does not exist (If-Match)")
            if versions is not None and record.version not in versions:
                raise HttpError(412, "the key has changed (If-Match does not match)")
            op = lambda c: c.store(  # noqa: E731
                StoreMode.CAS_DELETE, partition, key, b"", 0, 0, record.version
            )
            return router.conditional(partition, key, op).addCallback(check)

        def check(result: Any) -> bytes:
            if result.status is Status.DELETED:
                request.setResponseCode(204)
                return b""
            raise HttpError(412, "the key changed during the delete (If-Match)")

        return router.get(partition, key).addCallback(conditional)

    def _mget(self, request: Request, fmt: bytes, partition: bytes) -> Deferred:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            raise HttpError(415, 'send the key list as application/json: {"keys": [...]}')
        body = request.content.read() if request.content is not None else b""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"the body is not valid JSON: {e}") from None
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise HttpError(400, 'the body must be {"keys": [non-empty strings]}')
        if len(keys) > self.max_list:
            raise HttpError(413, f"at most {self.max_list} keys per request")
        raw_keys = [k.encode("utf-8") for k in keys]
        if fmt == RAW:
            fmt = JSON

        def render(records: list[Optional[Record]]) -> bytes:
            docs = []
            for key, record in zip(raw_keys, records):
                if record is None:
                    key_encoding, key_text = _encoded(key)
                    d = {"key": key_text, "found": False}
                    if key_encoding != "utf-8":
                        d["key_encoding"] = key_encoding
                    docs.append(d)
                else:
                    d = record_doc(partition, key, record)
                    d["found"] = True
                    docs.append(d)
            return self._reply(request, fmt, {"records": docs}, _records_xml)

        if not raw_keys:
            return defer.succeed(render([]))
        return self.router.get_many(partition, raw_keys).addCallback(render)

    def _list(self, request: Request, fmt: bytes, partition: bytes) -> Deferred:
        # Twisted declares Request.args as None (it is set per request).
        args = cast("dict[bytes, list[bytes]]", request.args)
        prefix = args.get(b"prefix", [b""])[0]
        limit_raw = args.get(b"limit", [b"%d" % min(100, self.max_list)])[0]
        cursor_raw = args.get(b"cursor", [b"0"])[0]
        if not limit_raw.isdigit() or not 1 <= int(limit_raw) <= self.max_list:
            raise HttpError(400, f"limit must be an integer from 1 to {self.max_list}")
        if not cursor_raw.isdigit() or int(cursor_raw) >= 1 << 64:
            raise HttpError(400, "cursor must be a cursor returned by an earlier listing")
        limit = int(limit_raw)
        if fmt == RAW:
            fmt = JSON
        found: list[bytes] = []
        budget = [limit * 10 + 1000]  # keys examined per request, like SCAN's COUNT
        done: Deferred = Deferred()

        def step(page: tuple[int, list[bytes]]) -> None:
            cursor, keys = page
            budget[0] -= len(keys)
            found.extend(k for k in keys if k.startswith(prefix))
            if cursor == 0 or len(found) >= limit or budget[0] <= 0:
                doc = {
                    "keys": [_encoded(k)[1] for k in found],
                    "cursor": str(cursor) if cursor else None,
                }
                done.callback(self._reply(request, fmt, doc, _keys_xml))
            else:
                self.router.scan(partition, cursor, limit - len(found)).addCallbacks(
                    step, done.errback
                )

        self.router.scan(partition, int(cursor_raw), limit).addCallbacks(step, done.errback)
        return done


def _etags(raw: bytes) -> Optional[set[int]]:
    """Versions named by an If-Match header; None for ``*`` (any)."""
    header = raw.decode("latin-1")
    if header.strip() == "*":
        return None
    versions = set()
    for part in header.split(","):
        tag = part.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        tag = tag.strip('"')
        if not tag.isdigit():
            raise HttpError(400, f"If-Match must name versions as ETags; got {part.strip()!r}")
        versions.add(int(tag))
    return versions


def _records_xml(doc: dict[str, Any]) -> str:
    items = []
    for d in doc["records"]:
        if d["found"]:
            items.append(record_xml(d))
        else:
            enc = d.get("key_encoding")
            enc_attr = f" key_encoding={quoteattr(enc)}" if enc else ""
            items.append(f'<record key={quoteattr(d["key"])}{enc_attr} found="false"/>')
    return "<records>" + "".join(items) + "</records>"


def _keys_xml(doc: dict[str, Any]) -> str:
    cursor = f" cursor={quoteattr(doc['cursor'])}" if doc["cursor"] else ""
    keys = "".join(f"<key>{_xml_text(k)}</key>" for k in doc["keys"])
    return f"<keys{cursor}>{keys}</keys>"


class ApiSite(server.Site):
    """The site object for ``strports``; quiet access logs (metrics count requests).

    ``budget`` bounds connections (shared with the master's other ports; over
    it a client gets 503 and is closed), ``idle_timeout`` closes silent
    connections (0: the Twisted default of 12 hours), and ``max_line_bytes``
    bounds the request line and each header line (longer gets 400).
    Requests on one connection are served one at a time: Twisted reads no
    further while a request is being answered.
    """

    def __init__(
        self,
        api: Resource,
        budget: Optional[ConnectionBudget] = None,
        idle_timeout: float = 0.0,
        max_line_bytes: int = 16384,
    ) -> None:
        if idle_timeout:
            super().__init__(api, timeout=idle_timeout)
        else:
            super().__init__(api)
        self.displayTracebacks = False
        self.budget = budget
        self.max_line_bytes = max_line_bytes

    def buildProtocol(self, addr: Any) -> Any:
        budget = self.budget
        if budget is not None and not budget.acquire():
            log.warn(
                "refused HTTP client {peer}: {limit} connections already open",
                peer=addr,
                limit=budget.limit,
            )
            return _Refuse()
        channel = super().buildProtocol(addr)
        inner = getattr(channel, "_channel", channel)
        inner.MAX_LENGTH = self.max_line_bytes
        inner.totalHeadersSize = max(inner.totalHeadersSize, self.max_line_bytes)
        inner.lineLengthExceeded = lambda line: _line_too_long(inner.transport)
        if budget is not None:
            lost = channel.connectionLost

            def connectionLost(reason: Any) -> None:
                budget.release()
                lost(reason)

            channel.connectionLost = connectionLost
        return channel

    def log(self, request: http.Request) -> None:
        pass


def _line_too_long(transport: Any) -> None:
    """A request line or header line over ``max_line_bytes``: 400, then close."""
    transport.write(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_LINE_TOO_LONG), _LINE_TOO_LONG)
    )
    transport.loseConnection()


_LINE_TOO_LONG = b'{"error": {"code": 400, "status": "bad_request", "message": "line too long"}}'
_TOO_MANY = b'{"error": {"code": 503, "status": "unavailable", "message": "too many connections"}}'


class _Refuse(Protocol):
    """What a client over the connection limit gets: 503, then the connection closes."""

    transport: ITransport  # None only before connectionMade

    def connectionMade(self) -> None:
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_TOO_MANY), _TOO_MANY)
        )
        self.transport.loseConnection()
