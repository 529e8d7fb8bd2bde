"""The REST Web API (``kvha.master.http``) through a real ``twisted.web`` Site, no network.

Each request is real HTTP/1.1 bytes fed to the Site's ``HTTPChannel`` over a
``StringTransport``; the reply bytes are parsed back with ``http.client``, so
the status line, headers and (chunked) body are what a client would get.
Behind the ``Api`` is an in-process cluster (``tests/inprocess.Cluster``:
real DataNodes, a real Router) on a ``Clock``.

Every reply is also checked against ``docs/openapi.yaml``: its status must be
documented for the operation and a JSON body must match the documented
schema, so the description cannot drift from the code.  XML bodies are
checked against the vocabulary of ``docs/http-api.md``.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from types import SimpleNamespace
from typing import Any, Optional, Union

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from kvha.master.auth import Authenticator
from kvha.master.http import MAX_TTL, Api, ApiSite
from kvha.master.memcache import MemcacheStats
from kvha.master.metrics import registry_for, render
from kvha.master.router import PartitionPolicy
from tests.inprocess import Cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "docs", "openapi.yaml")) as _f:
    SPEC = yaml.safe_load(_f)

ORIGIN = "http://app.example"
KEY = "/v1/p/default/k/"


# OpenAPI conformance -----------------------------------------------------------------------

_TEMPLATES = [
    (re.compile(r"^/v1/p/[^/]+/k/[^/]+$"), "/v1/p/{partition}/k/{key}"),
    (re.compile(r"^/v1/p/[^/]+/k/?$"), "/v1/p/{partition}/k"),
    (re.compile(r"^/v1/p/[^/]+/mget$"), "/v1/p/{partition}/mget"),
    (re.compile(r"^/health$"), "/health"),
    (re.compile(r"^/metrics$"), "/metrics"),
]


def _resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def conforms(value: Any, schema: Any, where: str = "$") -> None:
    """Check ``value`` against the subset of OpenAPI schema objects the spec uses."""
    schema = _resolve(schema)
    if value is None:
        assert schema.get("nullable"), f"{where}: null is not allowed"
        return
    if "oneOf" in schema:
        matches = 0
        for option in schema["oneOf"]:
            try:
                conforms(value, option, where)
            except AssertionError:
                continue
            matches += 1
        assert matches == 1, f"{where}: {value!r} matches {matches} of oneOf"
        return
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if kind is not None:
        assert checks[kind](value), f"{where}: {value!r} is not {kind}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "pattern" in schema:
        assert re.search(schema["pattern"], value), f"{where}: {value!r} !~ {schema['pattern']}"
    if "minLength" in schema:
        assert len(value) >= schema["minLength"], where
    if "minimum" in schema:
        assert value >= schema["minimum"], where
    if "maximum" in schema:
        assert value <= schema["maximum"], where
    if kind == "array":
        for i, item in enumerate(value):
            conforms(item, schema.get("items", {}), f"{where}[{i}]")
    if kind == "object":
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            assert name in value, f"{where}: {name!r} is required"
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                conforms(item, props[name], f"{where}.{name}")
            elif extra is False:
                raise AssertionError(f"{where}: {name!r} is not in the schema")
            elif isinstance(extra, dict):
                conforms(item, extra, f"{where}.{name}")


def check_documented(method: str, path: str, reply: Reply) -> None:
    """The reply's status is documented for the operation, and a JSON body matches."""
    template = next((t for rx, t in _TEMPLATES if rx.match(path)), None)
    if path.endswith("/k/") and method not in ("GET", "HEAD", "OPTIONS"):
        template = "/v1/p/{partition}/k/{key}"  # writing the empty key
    ctype = (reply.headers.get("Content-Type") or "").split(";")[0].strip()
    if reply.status == 405:
        assert reply.headers.get("Allow"), "405 without Allow"
        schema: Any = SPEC["components"]["schemas"]["Error"]
    elif template is None:
        assert reply.status in (204, 404), reply.status  # preflight or unknown path
        schema = SPEC["components"]["schemas"]["Error"] if reply.status == 404 else None
    else:
        ops = SPEC["paths"][template]
        operation = ops.get(method.lower()) or ops["get"]  # HEAD is documented as GET
        documented = operation["responses"]
        assert str(reply.status) in documented, (
            f"{method} {template} answered {reply.status}, not in docs/openapi.yaml "
            f"({', '.join(documented)})"
        )
        response = _resolve(documented[str(reply.status)])
        content = response.get("content", {})
        media = next((m for m in content if m.split(";")[0].strip() == ctype), None)
        if method != "HEAD" and reply.body and ctype:
            assert media is not None, f"{ctype} not documented for {method} {template}"
        schema = content[media]["schema"] if media is not None else None
    if method != "HEAD" and ctype == "application/json" and schema is not None:
        conforms(json.loads(reply.body), schema)
    if method != "HEAD" and ctype == "application/xml":
        check_xml(ET.fromstring(reply.body))


# The XML vocabulary (docs/http-api.md) ------------------------------------------------------

RECORD_ATTRS = {"partition", "key", "key_encoding", "version", "flags", "expires", "encoding"}


def check_xml(root: ET.Element) -> None:
    """``root`` is one of the documented documents: record, records, keys or error."""
    assert root.tag in ("record", "records", "keys", "error"), root.tag
    if root.tag == "record":
        check_record_element(root)
    elif root.tag == "records":
        assert not root.attrib and not (root.text or "").strip()
        for child in root:
            if child.get("found") == "false":
                assert set(child.attrib) <= {"key", "key_encoding", "found"}, child.attrib
                assert "key" in child.attrib and not child.text and len(child) == 0
            else:
                check_record_element(child)
    elif root.tag == "keys":
        assert set(root.attrib) <= {"cursor"}, root.attrib
        assert re.fullmatch(r"[0-9]+", root.get("cursor", "0"))
        for child in root:
            assert child.tag == "key" and not child.attrib and len(child) == 0
    else:
        assert set(root.attrib) == {"code", "status"}, root.attrib
        assert root.get("code", "").isdigit() and len(root) == 0 and root.text


def check_record_element(el: ET.Element) -> None:
    assert el.tag == "record" and len(el) == 0
    assert set(el.attrib) <= RECORD_ATTRS, el.attrib
    assert {"partition", "key", "version", "flags", "encoding"} <= set(el.attrib), el.attrib
    assert el.get("version", "").isdigit() and el.get("flags", "").isdigit()
    assert el.get("encoding") in ("utf-8", "base64")
    assert el.get("key_encoding") in (None, "base64")
    if "expires" in el.attrib:
        float(el.attrib["expires"])


# Requests through a real Site ---------------------------------------------------------------


class _Socket:
    def __init__(self, data: bytes) -> None:
        self.file = io.BytesIO(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self.file


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        assert self.headers["Content-Type"] == "application/json", self.headers["Content-Type"]
        return json.loads(self.body)

    def xml(self) -> ET.Element:
        assert self.headers["Content-Type"] == "application/xml; charset=utf-8"
        assert self.body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n')
        return ET.fromstring(self.body)

    def error(self) -> dict[str, Any]:
        doc = self.json()["error"]
        assert doc["code"] == self.status
        return doc

    def __repr__(self) -> str:
        return f"<Reply {self.status} {dict(self.headers)} {self.body[:200]!r}>"


class Web:
    """An Api over a Cluster, and a way to send it HTTP requests."""

    def __init__(self, cluster: Cluster, **options: Any) -> None:
        self.cluster = cluster
        self.clock = cluster.clock
        self.api = Api(cluster.router, cluster.clock, **options)
        self.site = ApiSite(self.api)
        self.site.reactor = cluster.clock  # channel timeouts on the Clock, not the reactor

    def request(
        self,
        method: str,
        path: str,
        body: Union[bytes, dict, list, None] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> Reply:
        return self.start(method, path, body, headers)()

    def start(
        self,
        method: str,
        path: str,
        body: Union[bytes, dict, list, None] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> Callable[[], Reply]:
        """Send a request; the returned function reads its reply (once it was written)."""
        hdrs = {"Host": "kvha.test"}
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        body = body or b""
        hdrs.update(headers or {})
        hdrs.setdefault("Content-Length", str(len(body)))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        transport = StringTransport()
        channel = self.site.buildProtocol(None)
        channel.makeConnection(transport)
        channel.dataReceived(head.encode("latin-1") + b"\r\n" + body)

        def reply() -> Reply:
            data = transport.value()
            channel.connectionLost(None)
            response = http.client.HTTPResponse(_Socket(data), method=method)  # type: ignore[arg-type]
            response.begin()
            result = Reply(response.status, response.msg, response.read())
            check_documented(method, path.split("?", 1)[0], result)
            return result

        return reply

    def get(self, path: str, **headers: str) -> Reply:
        return self.request("GET", path, headers=_h(headers))

    def put(self, path: str, body: Any = b"", **headers: str) -> Reply:
        return self.request("PUT", path, body, headers=_h(headers))

    def post(self, path: str, body: Any = b"", **headers: str) -> Reply:
        return self.request("POST", path, body, headers=_h(headers))

    def delete(self, path: str, **headers: str) -> Reply:
        return self.request("DELETE", path, headers=_h(headers))

    def advance(self, seconds: float) -> None:
        """Let time pass in ping-sized steps, so the node links stay up."""
        steps = int(seconds / 0.25)
        for _ in range(steps):
            self.clock.advance(0.25)
        self.clock.advance(seconds - steps * 0.25)


def _h(headers: Mapping[str, str]) -> dict[str, str]:
    """``If_Match="x"`` keyword arguments to ``If-Match: x`` headers."""
    return {k.replace("_", "-"): v for k, v in headers.items()}


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster(n=3, replicas=1)
    yield c
    c.stop()


@pytest.fixture
def web(cluster: Cluster) -> Web:
    return Web(cluster, cors_origins=[ORIGIN], max_value_bytes=64, max_list=50)


def etag(reply: Reply) -> str:
    tag = reply.headers["ETag"]
    assert tag is not None and re.fullmatch(r'"[0-9]+"', tag), tag
    return tag


# 200, 201, 204 and the representations ------------------------------------------------------


def test_put_raw_then_get_json(web: Web) -> None:
    """A raw PUT stores the body as is and GET returns it as a JSON record (the default)."""
    put = web.put(KEY + "greeting", b"hello", Content_Type="text/plain")
    assert put.status == 200
    doc = put.json()
    assert doc["value"] == "hello" and doc["encoding"] == "utf-8" and doc["key"] == "greeting"
    got = web.get(KEY + "greeting")
    assert got.status == 200
    assert got.json() == {
        "partition": "default",
        "key": "greeting",
        "value": "hello",
        "encoding": "utf-8",
        "version": doc["version"],
        "flags": 0,
        "expires": None,
    }


def test_put_without_content_type_is_raw(web: Web) -> None:
    """A PUT without Content-Type (or with curl -d's form type) stores the raw bytes."""
    assert web.put(KEY + "a", b"{not json}").status == 200
    assert web.get(KEY + "a").json()["value"] == "{not json}"
    form = web.put(KEY + "b", b"x=1&y=2", Content_Type="application/x-www-form-urlencoded")
    assert form.status == 200
    assert web.get(KEY + "b", Accept="application/octet-stream").body == b"x=1&y=2"


def test_put_json_body_with_value_encoding_flags_and_ttl(web: Web) -> None:
    """A JSON body sets value, flags and ttl; base64 encoding stores the decoded bytes."""
    now = web.clock.seconds()
    put = web.put(KEY + "j", {"value": "text", "flags": 7, "ttl": 30})
    assert put.status == 200
    doc = web.get(KEY + "j").json()
    assert (doc["value"], doc["flags"]) == ("text", 7)
    assert doc["expires"] == pytest.approx(now + 30)
    binary = bytes(range(0, 256, 4))
    body = {"value": base64.b64encode(binary).decode(), "encoding": "base64"}
    assert web.put(KEY + "b64", body).status == 200
    assert web.get(KEY + "b64", Accept="application/octet-stream").body == binary


def test_etag_is_the_version(web: Web) -> None:
    """The ETag of PUT and GET is the record's version in quotes and changes on every write."""
    first = web.put(KEY + "e", b"1")
    assert etag(first) == f'"{first.json()["version"]}"'
    got = web.get(KEY + "e")
    assert etag(got) == etag(first) == f'"{got.json()["version"]}"'
    second = web.put(KEY + "e", b"2")
    assert etag(second) != etag(first)
    assert int(second.json()["version"]) > int(first.json()["version"])


def test_post_creates_with_201_then_conflicts_with_409(web: Web) -> None:
    """POST creates a missing key (201 with ETag) and answers 409 when the key exists."""
    created = web.post(KEY + "new", b"one")
    assert created.status == 201
    assert etag(created) == f'"{created.json()["version"]}"'
    again = web.post(KEY + "new", b"two")
    assert again.status == 409
    assert again.error()["status"] == "conflict"
    assert web.get(KEY + "new").json()["value"] == "one"


def test_delete_answers_204_then_404(web: Web) -> None:
    """DELETE of an existing key is 204 with no body; the key is then gone (404)."""
    web.put(KEY + "d", b"x")
    gone = web.delete(KEY + "d")
    assert gone.status == 204 and gone.body == b""
    assert web.get(KEY + "d").status == 404
    assert web.delete(KEY + "d").status == 404


def test_head_returns_headers_without_body(web: Web) -> None:
    """HEAD on a key is 200 with the ETag and no body; on a missing key 404."""
    put = web.put(KEY + "h", b"body")
    head = web.request("HEAD", KEY + "h")
    assert head.status == 200 and head.body == b""
    assert etag(head) == etag(put)
    assert web.request("HEAD", KEY + "nothing").status == 404


def test_keys_are_percent_decoded_path_segments(web: Web) -> None:
    """A key is one percent-decoded segment: %2F is a slash, + stays a plus."""
    assert web.put(KEY + "a%2Fb+c%20d", b"v").status == 200
    assert web.get(KEY + "a%2Fb+c%20d").json()["key"] == "a/b+c d"
    assert web.get(KEY + "a/b").status == 404  # two segments: no such resource


def test_binary_value_comes_back_base64_in_json_and_xml(web: Web) -> None:
    """A value that is not UTF-8 is base64 with encoding "base64" in JSON and XML."""
    value = b"\xff\x00\xfe binary"
    web.put(KEY + "bin", value, Content_Type="application/octet-stream")
    doc = web.get(KEY + "bin").json()
    assert doc["encoding"] == "base64"
    assert base64.b64decode(doc["value"]) == value
    el = web.get(KEY + "bin", Accept="application/xml").xml()
    assert el.get("encoding") == "base64"
    assert base64.b64decode(el.text or "") == value
    raw = web.get(KEY + "bin", Accept="application/octet-stream")
    assert raw.body == value


def test_binary_key_comes_back_with_key_encoding(web: Web) -> None:
    """A key that is not UTF-8 is reported base64 with key_encoding in JSON and XML."""
    web.put(KEY + "%FF%00k", b"v")
    doc = web.get(KEY + "%FF%00k").json()
    assert doc["key_encoding"] == "base64"
    assert base64.b64decode(doc["key"]) == b"\xff\x00k"
    el = web.get(KEY + "%FF%00k", Accept="application/xml").xml()
    assert el.get("key_encoding") == "base64" and el.get("key") == doc["key"]


def test_xml_record_matches_the_schema(web: Web) -> None:
    """An XML record is one <record> element: attributes as documented, the value as text."""
    now = web.clock.seconds()
    web.put(KEY + "x?ttl=60", {"value": "<a & 'b'>", "flags": 3})
    reply = web.get(KEY + "x", Accept="application/xml")
    el = reply.xml()
    check_record_element(el)
    assert el.attrib == {
        "partition": "default",
        "key": "x",
        "version": etag(reply).strip('"'),
        "flags": "3",
        "expires": str(now + 60),
        "encoding": "utf-8",
    }
    assert el.text == "<a & 'b'>"


def test_xml_keeps_carriage_returns_and_refuses_non_characters(web: Web) -> None:
    """CR survives an XML round trip, and text XML cannot carry (U+FFFE, controls) is base64."""
    web.put(KEY + "cr", b"line1\r\nline2\rend\t")
    el = web.get(KEY + "cr", Accept="application/xml").xml()
    assert el.get("encoding") == "utf-8" and el.text == "line1\r\nline2\rend\t"
    for value in ("a\ufffeb".encode(), "a\uffffb".encode(), b"a\x01b", b"a\x00b"):
        web.put(KEY + "nc", value)
        el = web.get(KEY + "nc", Accept="application/xml").xml()
        assert el.get("encoding") == "base64"
        assert base64.b64decode(el.text or "") == value
        doc = web.get(KEY + "nc").json()
        assert doc["encoding"] == "base64" and base64.b64decode(doc["value"]) == value


def test_raw_representation_has_flags_header(web: Web) -> None:
    """Accept: application/octet-stream returns the bytes with X-Kvha-Flags and the ETag."""
    put = web.put(KEY + "r", {"value": "raw value", "flags": 4294967295})
    raw = web.get(KEY + "r", Accept="application/octet-stream")
    assert raw.status == 200
    assert raw.headers["Content-Type"] == "application/octet-stream"
    assert raw.headers["X-Kvha-Flags"] == "4294967295"
    assert raw.body == b"raw value"
    assert etag(raw) == etag(put)


def test_writes_reply_json_when_raw_is_accepted(web: Web) -> None:
    """A PUT with Accept: application/octet-stream still replies with a JSON record."""
    reply = web.put(KEY + "w", b"v", Accept="application/octet-stream")
    assert reply.status == 200 and reply.json()["value"] == "v"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("application/*", "application/json"),
        ("application/json", "application/json"),
        ("application/xml", "application/xml; charset=utf-8"),
        ("text/xml", "application/xml; charset=utf-8"),
        ("application/json;q=0.5, application/xml;q=0.9", "application/xml; charset=utf-8"),
        ("application/xml;q=0.1, application/json", "application/json"),
        (
            "text/html, application/xhtml+xml, application/xml;q=0.9, */*;q=0.8",
            "application/xml; charset=utf-8",
        ),  # noqa: E501
        ("text/html, */*;q=0.1", "application/json"),
        ("application/octet-stream", "application/octet-stream"),
        ("application/json;q=0.2, application/octet-stream", "application/octet-stream"),
    ],
)
def test_content_negotiation(web: Web, accept: Optional[str], expected: str) -> None:
    """Accept picks JSON (the default), XML or raw bytes by q-value."""
    web.put(KEY + "n", b"negotiated")
    headers = {"Accept": accept} if accept is not None else {}
    reply = web.request("GET", KEY + "n", headers=headers)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == expected


@pytest.mark.parametrize("accept", ["text/html", "application/json;q=0", "image/*, text/plain"])
def test_unacceptable_media_type_is_406(web: Web, accept: str) -> None:
    """An Accept that rules out JSON, XML and raw is 406 with a JSON error."""
    web.put(KEY + "n", b"v")
    reply = web.get(KEY + "n", Accept=accept)
    assert reply.status == 406
    assert reply.error()["status"] == "not_acceptable"
    assert web.put(KEY + "n", b"w", Accept=accept).status == 406
    assert web.get(KEY + "n").json()["value"] == "v"  # the refused PUT wrote nothing


# ttl -----------------------------------------------------------------------------------------


def test_ttl_query_parameter_expires_the_key(web: Web) -> None:
    """?ttl=10 sets expires to now + 10 s, and the key is gone once the Clock passes it."""
    now = web.clock.seconds()
    put = web.put(KEY + "t?ttl=10", b"short-lived")
    assert put.json()["expires"] == pytest.approx(now + 10)
    web.advance(9.5)
    assert web.get(KEY + "t").status == 200
    web.advance(1)
    assert web.get(KEY + "t").status == 404


def test_ttl_query_parameter_overrides_the_json_ttl(web: Web) -> None:
    """A ttl in the query wins over a ttl in the JSON body."""
    now = web.clock.seconds()
    reply = web.put(KEY + "t?ttl=100", {"value": "v", "ttl": 5})
    assert reply.json()["expires"] == pytest.approx(now + 100)


def test_a_form_encoded_post_body_is_the_value_not_parameters(web: Web) -> None:
    """A POST body sent as a form (curl -d 'ttl=5') is the value; it sets no ttl."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    reply = web.request("POST", KEY + "form", b"ttl=5", headers=form)
    assert reply.status == 201
    assert reply.json()["value"] == "ttl=5" and reply.json()["expires"] is None
    assert web.request("POST", KEY + "form2", b"ttl=abc", headers=form).status == 201


def test_post_takes_a_ttl_too(web: Web) -> None:
    """POST ?ttl= creates a key that expires."""
    assert web.post(KEY + "pt?ttl=2", b"v").status == 201
    web.advance(2.5)
    assert web.get(KEY + "pt").status == 404


# Conditional requests: 412 and friends -------------------------------------------------------


def test_if_match_with_the_etag_succeeds_and_a_stale_one_is_412(web: Web) -> None:
    """If-Match with the current ETag writes; the old ETag then gets 412 and writes nothing."""
    first = etag(web.put(KEY + "c", b"v1"))
    second = web.put(KEY + "c", b"v2", If_Match=first)
    assert second.status == 200
    stale = web.put(KEY + "c", b"v3", If_Match=first)
    assert stale.status == 412
    assert stale.error()["status"] == "precondition_failed"
    assert web.get(KEY + "c").json()["value"] == "v2"
    listed = web.put(KEY + "c", b"v4", If_Match=f'"1", W/{etag(second)}')
    assert listed.status == 200
    assert web.put(KEY + "c", b"v5", If_Match="*").status == 200


def test_if_match_on_a_missing_key_is_412(web: Web) -> None:
    """If-Match (an ETag or *) on a key that does not exist is 412 and creates nothing."""
    assert web.put(KEY + "none", b"v", If_Match='"123"').status == 412
    assert web.put(KEY + "none", b"v", If_Match="*").status == 412
    assert web.get(KEY + "none").status == 404


def test_if_none_match_star_creates_only(web: Web) -> None:
    """PUT with If-None-Match: * creates (201) and then answers 412 on the existing key."""
    assert web.put(KEY + "inm", b"a", If_None_Match="*").status == 201
    again = web.put(KEY + "inm", b"b", If_None_Match="*")
    assert again.status == 412
    assert web.get(KEY + "inm").json()["value"] == "a"


def test_delete_with_if_match(web: Web) -> None:
    """DELETE with a stale If-Match is 412, with the current ETag 204, on a missing key 412."""
    old = etag(web.put(KEY + "dm", b"1"))
    current = etag(web.put(KEY + "dm", b"2"))
    assert web.delete(KEY + "dm", If_Match=old).status == 412
    assert web.get(KEY + "dm").status == 200
    assert web.delete(KEY + "dm", If_Match=current).status == 204
    assert web.get(KEY + "dm").status == 404
    assert web.delete(KEY + "dm", If_Match=current).status == 412


# 400 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", ["0", "-5", "abc", "1.5", "", str(MAX_TTL + 1)])
def test_bad_ttl_query_is_400(web: Web, ttl: str) -> None:
    """A ttl that is not a whole number of seconds from 1 to ten years is 400."""
    reply = web.put(KEY + f"bt?ttl={ttl}", b"v")
    assert reply.status == 400
    assert reply.error()["status"] == "bad_request"
    assert web.get(KEY + "bt").status == 404


@pytest.mark.parametrize(
    "body",
    [
        {"value": "v", "ttl": 0},
        {"value": "v", "ttl": "5"},
        {"value": "v", "ttl": True},
        {"value": "v", "ttl": 1.5},
        {"value": "v", "flags": -1},
        {"value": "v", "flags": 1 << 32},
        {"value": "v", "flags": "1"},
        {"value": "v", "encoding": "latin-1"},
        {"value": 5},
        {"nothing": "here"},
        ["value"],
    ],
)
def test_bad_json_document_is_400(web: Web, body: Any) -> None:
    """A JSON body of the wrong shape (ttl, flags, encoding, value) is 400."""
    reply = web.put(KEY + "bj", body)
    assert reply.status == 400, reply
    assert web.get(KEY + "bj").status == 404


def test_invalid_json_is_400(web: Web) -> None:
    """A body that is not JSON (or not UTF-8) under application/json is 400."""
    for body in (b"{", b"", b"\xff\xfe"):
        reply = web.put(KEY + "ij", body, Content_Type="application/json")
        assert reply.status == 400
        assert "JSON" in reply.error()["message"]


def test_bad_base64_is_400(web: Web) -> None:
    """A base64 value that does not decode is 400."""
    reply = web.put(KEY + "b", {"value": "not base64!", "encoding": "base64"})
    assert reply.status == 400
    assert "base64" in reply.error()["message"]


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE"])
def test_empty_key_is_400(web: Web, method: str) -> None:
    """Writing or deleting the empty key (a trailing slash) is 400."""
    reply = web.request(method, "/v1/p/default/k/", b"v")
    assert reply.status == 400
    assert reply.error()["message"] == "the key is empty"


@pytest.mark.parametrize("header", ["abc", '"abc"', '"1", nope', "W/"])
def test_malformed_if_match_is_400(web: Web, header: str) -> None:
    """An If-Match that is neither * nor a list of version ETags is 400, for PUT and DELETE."""
    web.put(KEY + "m", b"v")
    assert web.put(KEY + "m", b"w", If_Match=header).status == 400
    assert web.delete(KEY + "m", If_Match=header).status == 400
    assert web.get(KEY + "m").json()["value"] == "v"


def test_unsupported_precondition_combinations_are_400(web: Web) -> None:
    """If-Match with If-None-Match or POST, and If-None-Match other than *, are 400."""
    tag = etag(web.put(KEY + "p", b"v"))
    assert web.put(KEY + "p", b"w", If_Match=tag, If_None_Match="*").status == 400
    assert web.post(KEY + "q", b"w", If_Match=tag).status == 400
    assert web.put(KEY + "p", b"w", If_None_Match=tag).status == 400
    assert web.get(KEY + "p").json()["value"] == "v"


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=abc", "limit=51", "limit=-1", "cursor=abc", "cursor=-1"]
)
def test_bad_limit_or_cursor_is_400(web: Web, query: str) -> None:
    """A listing limit outside 1..max_list or a cursor that is not a number is 400."""
    reply = web.get("/v1/p/default/k?" + query)
    assert reply.status == 400


def test_cursor_beyond_64_bits_is_400(web: Web) -> None:
    """A cursor of 2**64 or more cannot have come from a listing: 400."""
    assert web.get(f"/v1/p/default/k?cursor={1 << 64}").status == 400
    assert web.get(f"/v1/p/default/k?cursor={(1 << 64) - 1}").status == 200


@pytest.mark.parametrize(
    "body", [b"{", b'{"keys": "a"}', b'{"keys": [""]}', b'{"keys": [1]}', b"[1]", b"{}"]
)
def test_bad_mget_body_is_400(web: Web, body: bytes) -> None:
    """An mget body that is not {"keys": [non-empty strings]} is 400."""
    reply = web.post("/v1/p/default/mget", body, Content_Type="application/json")
    assert reply.status == 400


# 404, 405, 413, 415 --------------------------------------------------------------------------


def test_missing_key_is_404(web: Web) -> None:
    """GET of a key that was never written is 404 with a JSON error document."""
    reply = web.get(KEY + "never")
    assert reply.status == 404
    assert reply.error() == {"code": 404, "status": "not_found", "message": "no such key"}


def test_error_in_xml(web: Web) -> None:
    """With XML negotiated, an error is an <error code status> element with the message."""
    el = web.get(KEY + "never", Accept="application/xml").xml()
    assert el.tag == "error"
    assert el.attrib == {"code": "404", "status": "not_found"}
    assert el.text == "no such key"


def test_unknown_partition_is_404(web: Web) -> None:
    """Every /v1 resource of a partition that is not configured is 404."""
    for reply in (
        web.get("/v1/p/nope/k/a"),
        web.put("/v1/p/nope/k/a", b"v"),
        web.get("/v1/p/nope/k"),
        web.post("/v1/p/nope/mget", {"keys": ["a"]}),
    ):
        assert reply.status == 404
        assert "unknown partition" in reply.error()["message"]


@pytest.mark.parametrize(
    "path",
    ["/", "/v1", "/v2/p/default/k/a", "/v1/p/default", "/v1/p/default/x", "/v1/p/default/k/a/b"],
)
def test_unknown_path_is_404(web: Web, path: str) -> None:
    """A path that names no resource is 404."""
    reply = web.get(path)
    assert reply.status == 404
    assert reply.error()["status"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PATCH", KEY + "a", "GET, PUT, POST, DELETE, OPTIONS"),
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/metrics", "GET, HEAD"),
        ("GET", "/v1/p/default/mget", "POST, OPTIONS"),
        ("PUT", "/v1/p/default/k", "GET, OPTIONS"),
        ("HEAD", "/v1/p/default/k", "GET, OPTIONS"),
    ],
)
def test_wrong_method_is_405_with_allow(web: Web, method: str, path: str, allow: str) -> None:
    """A method the resource does not have is 405 with the Allow header."""
    reply = web.request(method, path)
    assert reply.status == 405
    assert reply.headers["Allow"] == allow
    if method != "HEAD":
        assert reply.error()["status"] == "method_not_allowed"


def test_value_over_the_limit_by_content_length_is_413(web: Web) -> None:
    """A raw body longer than max_value_bytes is 413 and nothing is stored."""
    assert web.put(KEY + "big", b"x" * 64).status == 200
    reply = web.put(KEY + "big", b"y" * 65)
    assert reply.status == 413
    assert reply.error()["status"] == "payload_too_large"
    assert web.get(KEY + "big").json()["value"] == "x" * 64
    assert web.post(KEY + "big2", b"y" * 65).status == 413


def test_json_body_over_the_content_length_limit_is_413(web: Web) -> None:
    """A JSON body whose Content-Length exceeds 4/3 of the limit plus 64 KiB is 413 unread."""
    padded = b'{"value": "x"' + b" " * (64 * 4 // 3 + 64 * 1024) + b"}"
    reply = web.put(KEY + "pad", padded, Content_Type="application/json")
    assert reply.status == 413


def test_value_over_the_limit_in_a_json_body_is_413(web: Web) -> None:
    """A JSON value (text or base64) that decodes to more than max_value_bytes is 413."""
    assert web.put(KEY + "jb", {"value": "x" * 65}).status == 413
    encoded = base64.b64encode(b"\xff" * 65).decode()
    assert web.put(KEY + "jb", {"value": encoded, "encoding": "base64"}).status == 413
    assert web.put(KEY + "jb", {"value": "é" * 33}).status == 413  # 66 bytes of UTF-8
    assert web.get(KEY + "jb").status == 404


def test_mget_with_too_many_keys_is_413(web: Web) -> None:
    """An mget of more than max_list keys is 413; exactly max_list is fine."""
    keys = [f"k{i}" for i in range(51)]
    assert web.post("/v1/p/default/mget", {"keys": keys}).status == 413
    assert web.post("/v1/p/default/mget", {"keys": keys[:50]}).status == 200


@pytest.mark.parametrize("ctype", ["application/xml", "image/png", "application/yaml"])
def test_put_with_unsupported_content_type_is_415(web: Web, ctype: str) -> None:
    """A PUT or POST body of a type that is neither raw nor JSON is 415."""
    reply = web.put(KEY + "u", b"<v/>", Content_Type=ctype)
    assert reply.status == 415
    assert reply.error()["status"] == "unsupported_media_type"
    assert web.post(KEY + "u", b"<v/>", Content_Type=ctype).status == 415


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_mget_with_a_non_json_body_is_415(web: Web, ctype: Optional[str]) -> None:
    """An mget body that is not application/json is 415."""
    headers = {"Content-Type": ctype} if ctype else {}
    reply = web.request("POST", "/v1/p/default/mget", b'{"keys": ["a"]}', headers=headers)
    assert reply.status == 415


# mget -----------------------------------------------------------------------------------------


def test_mget_returns_records_in_order_with_found_flags(web: Web) -> None:
    """mget returns one entry per key, in order, with found false for missing keys."""
    web.put(KEY + "m1", b"one")
    web.put(KEY + "m3", b"\xff")
    doc = web.post("/v1/p/default/mget", {"keys": ["m1", "m2", "m3", "m1"]}).json()
    records = doc["records"]
    assert [r["key"] for r in records] == ["m1", "m2", "m3", "m1"]
    assert [r["found"] for r in records] == [True, False, True, True]
    assert records[0]["value"] == "one" and records[0]["encoding"] == "utf-8"
    assert records[1] == {"key": "m2", "found": False}
    assert records[2]["encoding"] == "base64" and records[2]["value"] == "/w=="
    assert web.post("/v1/p/default/mget", {"keys": []}).json() == {"records": []}


def test_mget_in_xml(web: Web) -> None:
    """The XML mget reply is <records> of <record> elements, missing ones found="false"."""
    web.put(KEY + "m1", b"one")
    root = web.post(
        "/v1/p/default/mget", {"keys": ["m1", "m2", "ctl\x01"]}, Accept="text/xml"
    ).xml()
    assert root.tag == "records"
    first, second, third = list(root)
    assert first.get("key") == "m1" and first.text == "one" and "found" not in first.attrib
    assert second.attrib == {"key": "m2", "found": "false"}
    assert third.attrib == {
        "key": base64.b64encode(b"ctl\x01").decode(),
        "key_encoding": "base64",
        "found": "false",
    }


def test_mget_with_keys_xml_cannot_carry(web: Web) -> None:
    """A missing key with a control character is reported base64 with key_encoding in JSON."""
    doc = web.post("/v1/p/default/mget", {"keys": ["a\x01"]}).json()
    assert doc == {
        "records": [
            {"key": base64.b64encode(b"a\x01").decode(), "key_encoding": "base64", "found": False}
        ]
    }


# Listing --------------------------------------------------------------------------------------


def _list_all(web: Web, query: str, limit: int) -> list[list[str]]:
    pages = []
    cursor: Optional[str] = "0"
    while cursor is not None:
        reply = web.get(f"/v1/p/default/k?{query}&limit={limit}&cursor={cursor}")
        assert reply.status == 200
        doc = reply.json()
        assert len(doc["keys"]) <= limit
        pages.append(doc["keys"])
        cursor = doc["cursor"]
        assert len(pages) < 1000, "the listing does not end"
    return pages


def test_listing_paginates_through_every_key_exactly_once(web: Web) -> None:
    """Following the cursor with a prefix and a small limit returns each key exactly once."""
    wanted = {f"user:{i}" for i in range(120)}
    for key in sorted(wanted) + [f"other:{i}" for i in range(80)]:
        assert web.put(KEY + key, b"v").status == 200
    pages = _list_all(web, "prefix=user%3A", 7)
    listed = [k for page in pages for k in page]
    assert len(listed) == len(set(listed)) == 120
    assert set(listed) == wanted
    assert len(pages) >= 120 // 7
    everything = [k for page in _list_all(web, "", 50) for k in page]
    assert len(everything) == len(set(everything)) == 200


def test_listing_in_xml(web: Web) -> None:
    """An XML listing page is <keys cursor> of <key> elements; the last page has no cursor."""
    for i in range(5):
        web.put(KEY + f"x{i}", b"v")
    page = web.get("/v1/p/default/k?limit=2", Accept="application/xml").xml()
    assert page.tag == "keys" and page.get("cursor", "").isdigit()
    assert [k.tag for k in page] == ["key", "key"]
    last = web.get("/v1/p/default/k/?limit=50", Accept="application/xml").xml()
    assert "cursor" not in last.attrib
    assert sorted(k.text or "" for k in last) == [f"x{i}" for i in range(5)]


def test_listing_default_limit_respects_a_small_max_list(cluster: Cluster) -> None:
    """With max_list below 100, a listing without limit uses max_list instead of failing."""
    web = Web(cluster, max_list=10)
    for i in range(30):
        web.put(KEY + f"k{i}", b"v")
    reply = web.get("/v1/p/default/k")
    assert reply.status == 200
    assert 0 < len(reply.json()["keys"]) <= 10


def test_listing_of_an_empty_partition(web: Web) -> None:
    """Listing an empty partition is one page with no keys and a null cursor."""
    assert web.get("/v1/p/default/k").json() == {"keys": [], "cursor": None}


# 503 and /health ------------------------------------------------------------------------------


def test_health_is_200_while_every_key_has_a_live_copy(web: Web) -> None:
    """/health is 200 with all nodes up and with one of three down at replicas 1."""
    reply = web.get("/health")
    assert reply.status == 200
    assert reply.json() == {
        "status": "ok",
        "data_nodes": {"data1": "up", "data2": "up", "data3": "up"},
    }
    web.cluster.kill("data2")
    reply = web.get("/health")
    assert reply.status == 200
    assert reply.json()["data_nodes"]["data2"] == "down"


def test_health_is_503_when_data_nodes_are_down(web: Web) -> None:
    """/health is 503 "unavailable" once more nodes are down than there are replicas."""
    web.cluster.kill("data1")
    web.cluster.kill("data3")
    reply = web.get("/health")
    assert reply.status == 503
    assert reply.json() == {
        "status": "unavailable",
        "data_nodes": {"data1": "down", "data2": "up", "data3": "down"},
    }
    web.cluster.revive("data1")
    assert web.get("/health").status == 200


def test_starting_master_answers_503_until_it_serves(web: Web) -> None:
    """While the master starts (Router.loading), /health and the key API answer 503
    (with Retry-After), even with every node up, and nothing is written."""
    router = web.cluster.router
    router.loading = True
    health = web.get("/health")
    assert health.status == 503 and health.json()["status"] == "loading"
    assert health.headers["Retry-After"] == "1"
    put = web.put("/v1/p/default/k/a", b"v")
    assert put.status == 503
    assert put.headers["Retry-After"] == "1"
    assert "starting" in put.json()["error"]["message"]
    assert web.get("/v1/p/default/k/a").status == 503
    assert all(node.store.get(b"default", b"a") is None for node in web.cluster.nodes.values())
    router.loading = False
    assert web.get("/health").status == 200
    assert web.put("/v1/p/default/k/a", b"v").status == 200
    assert web.get("/v1/p/default/k/a").json()["value"] == "v"


def test_health_ignores_accept(web: Web) -> None:
    """/health answers JSON whatever the Accept header says (no 406)."""
    reply = web.get("/health", Accept="text/plain")
    assert reply.status == 200 and reply.json()["status"] == "ok"


def test_requests_are_503_when_no_copy_is_live(web: Web) -> None:
    """Reads, writes, deletes, mget and listings are 503 when their copies are all down."""
    web.put(KEY + "k", b"v")
    copies = [link.node_id for link in web.cluster.router.copies_of(b"default", b"k")]
    for node_id in copies:
        web.cluster.kill(node_id)
    for reply in (
        web.get(KEY + "k"),
        web.put(KEY + "k", b"w"),
        web.post(KEY + "k", b"w"),
        web.delete(KEY + "k"),
        web.put(KEY + "k", b"w", If_Match="*"),
        web.post("/v1/p/default/mget", {"keys": ["k"]}),
    ):
        assert reply.status == 503, reply
        assert reply.error()["status"] == "unavailable"
    xml = web.get(KEY + "k", Accept="application/xml").xml()
    assert xml.attrib == {"code": "503", "status": "unavailable"}
    for node_id in web.cluster.nodes:
        web.cluster.kill(node_id)
    assert web.get("/v1/p/default/k").status == 503


def test_a_copy_failing_mid_request_is_503_without_a_traceback(web: Web) -> None:
    """A read whose last live copy drops its connection mid-request is 503 and logs no failure."""
    web.put(KEY + "mid", b"v")
    first, second = (link.node_id for link in web.cluster.router.copies_of(b"default", b"mid"))
    web.cluster.kill(second)
    web.cluster.clients[first].hold()  # the request is sent, and hangs
    pending = web.start("GET", KEY + "mid")
    logged: list[dict] = []
    observer = logged.append
    globalLogPublisher.addObserver(observer)
    try:
        web.cluster.kill(first)  # ... until the connection resets
        reply = pending()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert reply.status == 503
    assert reply.error()["status"] == "unavailable"
    assert not [e for e in logged if "log_failure" in e], logged


# CORS -----------------------------------------------------------------------------------------


def test_cors_allowed_origin_gets_allow_origin_and_expose_headers(web: Web) -> None:
    """A request from an allowed origin gets Access-Control-Allow-Origin and Expose-Headers."""
    reply = web.put(KEY + "c", b"v", Origin=ORIGIN)
    assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = {h.strip() for h in reply.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"ETag", "X-Kvha-Flags"} <= exposed
    assert reply.headers["Vary"] == "Origin"
    missing = web.get(KEY + "nothing", Origin=ORIGIN)  # errors are readable too
    assert missing.status == 404
    assert missing.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_cors_other_origin_gets_no_cors_headers(web: Web) -> None:
    """A request from an origin not in cors_origins gets no Access-Control headers."""
    for reply in (
        web.get(KEY + "c", Origin="http://evil.example"),
        web.request("OPTIONS", KEY + "c", headers={"Origin": "http://evil.example"}),
    ):
        assert reply.headers["Access-Control-Allow-Origin"] is None
        assert reply.headers["Access-Control-Expose-Headers"] is None


def test_cors_is_off_without_cors_origins(cluster: Cluster) -> None:
    """Without cors_origins no origin gets CORS headers, and preflights only get Allow."""
    web = Web(cluster)
    reply = web.get("/health", Origin=ORIGIN)
    assert reply.headers["Access-Control-Allow-Origin"] is None
    pre = web.request("OPTIONS", KEY + "a", headers={"Origin": ORIGIN})
    assert pre.status == 204
    assert pre.headers["Allow"] == "GET, PUT, POST, DELETE, OPTIONS"
    assert pre.headers["Access-Control-Allow-Methods"] is None


def test_cors_wildcard_allows_any_origin(cluster: Cluster) -> None:
    """cors_origins ["*"] answers every origin with Access-Control-Allow-Origin: *."""
    web = Web(cluster, cors_origins=["*"])
    reply = web.get("/health", Origin="http://anywhere.example")
    assert reply.headers["Access-Control-Allow-Origin"] == "*"


def test_cors_preflight(web: Web) -> None:
    """OPTIONS from an allowed origin is 204 with Allow-Methods, Allow-Headers and Max-Age."""
    reply = web.request(
        "OPTIONS",
        KEY + "c",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type, if-match",
        },
    )
    assert reply.status == 204 and reply.body == b""
    assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
    methods = {m.strip() for m in reply.headers["Access-Control-Allow-Methods"].split(",")}
    assert {"GET", "PUT", "POST", "DELETE"} <= methods
    allowed = {h.strip().lower() for h in reply.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "if-match", "if-none-match", "accept"} <= allowed
    assert reply.headers["Access-Control-Max-Age"] == "600"
    for path in ("/v1/p/default/k", "/v1/p/default/mget"):
        assert web.request("OPTIONS", path, headers={"Origin": ORIGIN}).status == 204


# /metrics -------------------------------------------------------------------------------------


def stand_in_master(cluster: Cluster, **more: Any) -> SimpleNamespace:
    """What the metrics collector reads of a master, over an in-process cluster."""
    return SimpleNamespace(
        links=cluster.links,
        router=cluster.router,
        memcache_stats=MemcacheStats(cluster.clock),
        resp_factory=None,
        api=None,
        **more,
    )


def test_metrics_is_valid_prometheus_text(cluster: Cluster) -> None:
    """/metrics parses as Prometheus text and counts HTTP requests and errors by code."""
    master = stand_in_master(cluster)
    registry = registry_for(master)
    web = Web(cluster, metrics=lambda: render(registry))
    master.api = web.api
    web.put(KEY + "a", b"v")
    web.get(KEY + "missing")
    web.get(KEY + "missing", Accept="application/xml")
    web.put(KEY + "a", b"v", Content_Type="image/png")
    cluster.kill("data3")
    reply = web.get("/metrics", Accept="text/plain")  # a scraper's Accept is no reason for 406
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("kvha_http_requests_total", ())] == 5  # the scrape counts itself
    assert samples[("kvha_http_errors_total", (("code", "404"),))] == 2
    assert samples[("kvha_http_errors_total", (("code", "415"),))] == 1
    assert samples[("kvha_data_node_up", (("node", "data1"),))] == 1
    assert samples[("kvha_data_node_up", (("node", "data3"),))] == 0
    assert ("kvha_memcached_commands_total", (("counter", "cmd_get"),)) in samples
    assert ("kvha_quorum_read_repairs_total", ()) in samples
    assert samples[("kvha_master_loading", ())] == 0
    head = web.request("HEAD", "/metrics")
    assert head.status == 200 and head.body == b""


def test_metrics_show_loading_logins_and_take_overs(cluster: Cluster) -> None:
    """The start-up LOADING state, login outcomes and a scaling take-over are visible."""
    auth = Authenticator(cluster.router)
    master = stand_in_master(
        cluster,
        authenticator=auth,
        cluster_manager=SimpleNamespace(taken_over=("join", "data9")),
    )
    registry = registry_for(master)
    cluster.router.loading = True
    auth.successes, auth.failures, auth.refused = 3, 12, 2

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = render(registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    got = samples()
    assert got[("kvha_master_loading", ())] == 1
    assert got[("kvha_logins_total", (("outcome", "success"),))] == 3
    assert got[("kvha_logins_total", (("outcome", "failure"),))] == 12
    assert got[("kvha_logins_total", (("outcome", "refused"),))] == 2
    assert got[("kvha_scaling_taken_over", ())] == 1
    cluster.router.loading = False
    master.cluster_manager.taken_over = None
    got = samples()
    assert got[("kvha_master_loading", ())] == 0
    assert got[("kvha_scaling_taken_over", ())] == 0


def test_metrics_without_a_registry_is_empty(web: Web) -> None:
    """An Api without a metrics source serves an empty (valid) /metrics."""
    reply = web.get("/metrics")
    assert reply.status == 200 and reply.body == b""


# The description itself -----------------------------------------------------------------------


def test_openapi_describes_every_route(web: Web) -> None:
    """docs/openapi.yaml has exactly the routes and methods the Api serves."""
    assert set(SPEC["paths"]) == {t for _, t in _TEMPLATES}
    methods = {p: {m for m in ops if m != "parameters"} for p, ops in SPEC["paths"].items()}
    assert methods == {
        "/v1/p/{partition}/k/{key}": {"get", "head", "put", "post", "delete", "options"},
        "/v1/p/{partition}/k": {"get", "options"},
        "/v1/p/{partition}/mget": {"post", "options"},
        "/health": {"get"},
        "/metrics": {"get"},
    }


def test_quorum_partitions_are_served_too() -> None:
    """A second partition (quorum reads) is its own namespace under /v1/p/{partition}."""
    c = Cluster(
        n=3,
        replicas=2,
        partitions=[PartitionPolicy("default"), PartitionPolicy("q", read="quorum")],
    )
    try:
        web = Web(c)
        assert web.put("/v1/p/q/k/a", b"in q").status == 200
        assert web.get("/v1/p/q/k/a").json()["partition"] == "q"
        assert web.get("/v1/p/default/k/a").status == 404
        assert web.get("/v1/p/q/k").json()["keys"] == ["a"]
    finally:
        c.stop()
