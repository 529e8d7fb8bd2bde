"""The HTTP API of a real twistd master in front of three real data nodes, end to end.

Requests go over loopback with ``urllib``; one value is seen through the
memcached, Redis and HTTP ports of the same master; and a headless Chromium
runs a page from another origin that calls the API with ``fetch()``, once
from an origin in ``http.cors_origins`` and once from one that is not.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import xml.etree.ElementTree as ET
from email.message import Message
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import pytest_twisted
import redis
from prometheus_client.parser import text_string_to_metric_families
from pymemcache.client.base import Client
from twisted.internet import reactor, threads
from twisted.web.server import Site

from kvha.procs import free_port
from tests.conftest import memcache_command

pytestmark = pytest.mark.process

#: Every client request gives up after this long, so no test can hang on one.
TIMEOUT = 5.0
MAX_VALUE = 4096
MAX_LIST = 20


class Http:
    """urllib against one master's HTTP port; no proxies, every status returned."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __call__(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Optional[dict[str, str]] = None,
    ) -> tuple[int, Message, bytes]:
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        if body is not None:
            headers.setdefault("Content-Type", "application/octet-stream")
        request = urllib.request.Request(self.base + path, body, headers, method=method)
        try:
            with self.opener.open(request, timeout=TIMEOUT) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.headers, e.read()

    def json(self, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
        status, hdrs, data = self(method, path, body, _h(headers))
        assert hdrs["Content-Type"] == "application/json", (status, hdrs, data)
        return status, json.loads(data)


def _h(headers: dict[str, str]) -> dict[str, str]:
    return {k.replace("_", "-"): v for k, v in headers.items()}


def start_stack(nodes: Any) -> SimpleNamespace:
    """Three data nodes and a master with memcached, Redis and HTTP ports; pages' origins."""
    http_port, redis_port = free_port(), free_port()
    allowed_port, denied_port = free_port(), free_port()
    allowed = f"http://127.0.0.1:{allowed_port}"
    master, data = nodes.cluster(
        n_data=3,
        replicas=1,
        redis={"listen": f"tcp:{redis_port}:interface=127.0.0.1"},
        http={
            "listen": f"tcp:{http_port}:interface=127.0.0.1",
            "cors_origins": [allowed],
            "max_list": MAX_LIST,
        },
        limits={"max_value_bytes": MAX_VALUE},
    )
    http = Http(http_port)
    deadline = time.monotonic() + 15
    while True:  # the HTTP listener starts with the others; wait until it answers
        try:
            if http("GET", "/health")[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"/health never answered 200\n{master.log()}"
        time.sleep(0.05)
    return SimpleNamespace(
        master=master,
        data=data,
        http=http,
        http_port=http_port,
        redis_port=redis_port,
        allowed_port=allowed_port,
        allowed=allowed,
        denied_port=denied_port,
    )


K = "/v1/p/default/k/"


def test_every_status_code_over_http(nodes):  # type: ignore[no-untyped-def]
    """200, 201, 204, 400, 404, 405, 406, 409, 412, 413 and 415 come back over real HTTP."""
    s = start_stack(nodes)
    http = s.http

    status, doc = http.json("PUT", K + "greeting?ttl=600", b"hello")
    assert status == 200 and doc["value"] == "hello" and doc["expires"] is not None
    status, hdrs, body = http("GET", K + "greeting")
    assert status == 200 and hdrs["ETag"] == f'"{doc["version"]}"'
    assert json.loads(body)["value"] == "hello"

    status, created = http.json("POST", K + "fresh", {"value": "v", "flags": 3})
    assert status == 201 and created["flags"] == 3
    assert http.json("POST", K + "fresh", b"again")[0] == 409
    assert http.json("PUT", K + "fresh", b"x", If_None_Match="*")[0] == 412
    assert http.json("PUT", K + "fresh", b"x", If_Match='"1"')[0] == 412
    status, _ = http.json("PUT", K + "fresh", b"x", If_Match=f'"{created["version"]}"')
    assert status == 200

    status, hdrs, body = http("DELETE", K + "fresh")
    assert status == 204 and body == b""
    status, err = http.json("GET", K + "fresh")
    assert status == 404 and err["error"] == {
        "code": 404,
        "status": "not_found",
        "message": "no such key",
    }
    assert http.json("GET", "/v1/p/nope/k/a")[0] == 404
    assert http.json("GET", "/nowhere")[0] == 404

    assert http.json("PUT", K + "bad?ttl=0", b"v")[0] == 400
    assert http.json("PUT", K + "bad", b"{", Content_Type="application/json")[0] == 400
    assert http.json("PUT", K + "bad", {"value": "!!", "encoding": "base64"})[0] == 400
    assert http.json("GET", "/v1/p/default/k?limit=0")[0] == 400
    assert http.json("GET", "/v1/p/default/k?cursor=x")[0] == 400
    assert http.json("PUT", K + "greeting", b"v", If_Match="nonsense")[0] == 400
    assert http.json("DELETE", K)[0] == 400  # the empty key

    status, hdrs, body = http("PATCH", K + "greeting", b"v")
    assert status == 405 and hdrs["Allow"] == "GET, PUT, POST, DELETE, OPTIONS"
    status, hdrs, _ = http("POST", "/health", b"")
    assert status == 405 and hdrs["Allow"] == "GET, HEAD"

    status, hdrs, body = http("GET", K + "greeting", headers={"Accept": "text/html"})
    assert status == 406 and json.loads(body)["error"]["status"] == "not_acceptable"

    assert http.json("PUT", K + "big", b"x" * MAX_VALUE)[0] == 200
    assert http.json("PUT", K + "big", b"x" * (MAX_VALUE + 1))[0] == 413
    assert http.json("PUT", K + "big", {"value": "y" * (MAX_VALUE + 1)})[0] == 413
    keys = [f"k{i}" for i in range(MAX_LIST + 1)]
    assert http.json("POST", "/v1/p/default/mget", {"keys": keys})[0] == 413

    assert http.json("PUT", K + "x", b"<x/>", Content_Type="application/xml")[0] == 415
    status, _ = http.json("POST", "/v1/p/default/mget", b'{"keys": []}', Content_Type="text/plain")
    assert status == 415

    # Content negotiation, binary values and XML over the wire.
    assert http.json("PUT", K + "bin", b"\x00\xff\xfe")[0] == 200
    status, hdrs, body = http("GET", K + "bin", headers={"Accept": "application/xml"})
    assert status == 200 and hdrs["Content-Type"] == "application/xml; charset=utf-8"
    el = ET.fromstring(body)
    assert el.tag == "record" and el.get("encoding") == "base64"
    assert base64.b64decode(el.text or "") == b"\x00\xff\xfe"
    status, hdrs, body = http("GET", K + "bin", headers={"Accept": "application/octet-stream"})
    assert body == b"\x00\xff\xfe" and hdrs["X-Kvha-Flags"] == "0"

    # Listing and mget.
    for i in range(30):
        assert http.json("PUT", K + f"list:{i}", b"v")[0] == 200
    listed: list[str] = []
    cursor: Optional[str] = "0"
    while cursor is not None:
        status, page = http.json("GET", f"/v1/p/default/k?prefix=list%3A&limit=7&cursor={cursor}")
        assert status == 200 and len(page["keys"]) <= 7
        listed += page["keys"]
        cursor = page["cursor"]
    assert sorted(listed) == sorted(f"list:{i}" for i in range(30))
    status, doc = http.json("POST", "/v1/p/default/mget", {"keys": ["list:1", "none"]})
    assert status == 200
    assert [r["found"] for r in doc["records"]] == [True, False]

    # CORS headers for the configured origin only.
    _, hdrs, _ = http("GET", K + "greeting", headers={"Origin": s.allowed})
    assert hdrs["Access-Control-Allow-Origin"] == s.allowed
    _, hdrs, _ = http("GET", K + "greeting", headers={"Origin": "http://127.0.0.1:1"})
    assert hdrs["Access-Control-Allow-Origin"] is None

    # /metrics counts what happened above.
    status, hdrs, body = http("GET", "/metrics", headers={"Accept": "text/plain"})
    assert status == 200 and hdrs["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {
        (m.name, tuple(sorted(m.labels.items()))): m.value
        for family in text_string_to_metric_families(body.decode())
        for m in family.samples
    }
    assert samples[("kvha_http_errors_total", (("code", "413"),))] == 3
    assert samples[("kvha_data_node_up", (("node", "data1"),))] == 1
    assert samples[("kvha_http_requests_total", ())] > 50
    assert "Traceback" not in s.master.log()


def test_503_when_the_data_nodes_are_down(nodes):  # type: ignore[no-untyped-def]
    """With data nodes killed, /health and key requests answer 503 with an error document."""
    s = start_stack(nodes)
    http = s.http
    assert http.json("PUT", K + "k", b"v")[0] == 200
    s.data[0].kill()
    status, doc = _health_when(http, lambda doc: doc["data_nodes"]["data1"] == "down")
    assert status == 200 and doc["status"] == "ok"  # one of three down at replicas 1: fine
    for node in s.data[1:]:
        node.kill()
    status, doc = _health_when(http, lambda doc: "up" not in doc["data_nodes"].values())
    assert status == 503
    assert doc == {
        "status": "unavailable",
        "data_nodes": {"data1": "down", "data2": "down", "data3": "down"},
    }
    for method, path, body in (
        ("GET", K + "k", None),
        ("PUT", K + "k", b"w"),
        ("POST", K + "k2", b"w"),
        ("DELETE", K + "k", None),
        ("GET", "/v1/p/default/k", None),
        ("POST", "/v1/p/default/mget", {"keys": ["k"]}),
    ):
        status, doc = http.json(method, path, body)
        assert status == 503, (method, path, doc)
        assert doc["error"]["code"] == 503 and doc["error"]["status"] == "unavailable"
    status, hdrs, body = http("GET", K + "k", headers={"Accept": "application/xml"})
    assert status == 503
    assert ET.fromstring(body).attrib == {"code": "503", "status": "unavailable"}
    assert "Traceback" not in s.master.log()


def _health_when(http: Http, ready: Any, timeout: float = 10.0) -> tuple[int, Any]:
    """/health once ``ready(doc)`` holds (the master sees a kill within moments)."""
    deadline = time.monotonic() + timeout
    while True:
        status, doc = http.json("GET", "/health")
        if ready(doc):
            return status, doc
        assert time.monotonic() < deadline, f"/health never got there: {doc}"
        time.sleep(0.05)


def test_one_value_through_memcached_redis_and_http(nodes):  # type: ignore[no-untyped-def]
    """A value set over one protocol is read back over the other two, flags and all."""
    s = start_stack(nodes)
    http = s.http
    mc = Client(
        ("127.0.0.1", s.master.port),
        default_noreply=False,
        connect_timeout=TIMEOUT,
        timeout=TIMEOUT,
    )
    r = redis.Redis(
        host="127.0.0.1",
        port=s.redis_port,
        protocol=2,  # kvha speaks RESP2; redis-py 8 would otherwise open with HELLO 3
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
    )
    try:
        # memcached -> Redis, HTTP (JSON, XML, raw)
        assert mc.set("shared", b"from memcached", flags=5) is True
        assert r.get("shared") == b"from memcached"
        status, doc = http.json("GET", K + "shared")
        assert status == 200
        assert (doc["value"], doc["encoding"], doc["flags"]) == ("from memcached", "utf-8", 5)
        status, hdrs, body = http("GET", K + "shared", headers={"Accept": "application/xml"})
        el = ET.fromstring(body)
        assert el.text == "from memcached" and el.get("flags") == "5"
        assert el.get("version") == hdrs["ETag"].strip('"') == doc["version"]
        _, hdrs, body = http("GET", K + "shared", headers={"Accept": "application/octet-stream"})
        assert body == b"from memcached" and hdrs["X-Kvha-Flags"] == "5"
        _, cas = mc.gets("shared")
        assert cas.decode() == doc["version"]  # the memcached CAS token is the ETag

        # HTTP -> memcached, Redis
        value = "from HTTP: é ✓"
        status, doc = http.json("PUT", K + "web", {"value": value, "flags": 9})
        assert status == 200
        assert mc.get("web") == value.encode()
        raw = memcache_command(s.master.port, b"get web\r\n")
        assert raw.startswith(b"VALUE web 9 %d\r\n" % len(value.encode())), raw
        assert r.get("web") == value.encode()

        # Redis -> HTTP, binary; HTTP delete is seen by both.
        r.set("bin", b"\xff\x00redis")
        status, doc = http.json("GET", K + "bin")
        assert doc["encoding"] == "base64" and base64.b64decode(doc["value"]) == b"\xff\x00redis"
        status, _, _ = http("DELETE", K + "web")
        assert status == 204
        assert mc.get("web") is None and r.get("web") is None

        # A ttl set over HTTP is a TTL for Redis too.
        http.json("PUT", K + "ttl?ttl=100", b"v")
        assert 90 <= r.ttl("ttl") <= 100
    finally:
        mc.close()
        r.close()


# The browser ---------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>kvha fetch</title></head>
<body><pre id="read">pending</pre><pre id="result">pending</pre>
<script>
const base = "__API__/v1/p/default/k/";
const out = document.getElementById("result");
async function run() {
  // A simple GET (no preflight): the server answers, the browser decides who may read it.
  try {
    const seeded = await fetch(base + "seeded");
    document.getElementById("read").textContent = "READ " + (await seeded.json()).value;
  } catch (e) {
    document.getElementById("read").textContent = "BLOCKED " + e.name;
  }
  try {
    const put = await fetch(base + "__KEY__", {
      method: "PUT",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({value: "__VALUE__", flags: 7}),
    });
    const etag = put.headers.get("ETag");
    const cas = await fetch(base + "__KEY__", {
      method: "PUT",
      headers: {"Content-Type": "text/plain", "If-Match": etag},
      body: "__VALUE__",
    });
    const get = await fetch(base + "__KEY__", {headers: {"Accept": "application/json"}});
    const doc = await get.json();
    out.textContent = ["OK", put.status, cas.status, get.status, doc.value,
                       get.headers.get("ETag") === '"' + doc.version + '"'].join(" ");
  } catch (e) {
    out.textContent = "FAILED " + e.name + ": " + e.message;
  }
}
run();
</script></body></html>
"""


def _chromium() -> str:
    """The Chromium binary, or skip (fail in CI) with the reason."""
    path = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI for the browser test but is not installed")
        pytest.skip("chromium is not installed (apt-get install chromium): no browser test")
    return path


def _dump_dom(chromium: str, url: str, profile: str) -> str:
    """The DOM of ``url`` after its scripts ran, from headless Chromium."""
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _text(dom: str, element_id: str) -> str:
    """The text of ``<pre id=element_id>`` in a dumped DOM."""
    tag = f'<pre id="{element_id}">'
    start = dom.index(tag) + len(tag)
    return dom[start : dom.index("</pre>", start)]


@pytest_twisted.inlineCallbacks
def test_browser_fetch_from_another_origin(nodes):  # type: ignore[no-untyped-def]
    """Chromium's fetch() PUT/GET works from an allowed origin and fails from any other."""
    chromium = _chromium()
    s = yield threads.deferToThread(start_stack, nodes)
    status, _ = yield threads.deferToThread(s.http.json, "PUT", K + "seeded", b"seeded by urllib")
    assert status == 200
    api = f"http://127.0.0.1:{s.http_port}"
    pages = tempfile.mkdtemp(prefix="kvha-pages-")
    for name, key, value in (
        ("allowed", "from-browser", "fetched in Chromium"),
        ("denied", "from-elsewhere", "must not be stored"),
    ):
        html = PAGE.replace("__API__", api).replace("__KEY__", key).replace("__VALUE__", value)
        with open(os.path.join(pages, f"{name}.html"), "w") as f:
            f.write(html)
    with warnings.catch_warnings():  # twisted.web.static's own deprecated internals
        warnings.simplefilter("ignore", DeprecationWarning)
        from twisted.web.static import File
    site = Site(File(pages))
    # The same page server on two ports: two origins, one of them in cors_origins.
    ports = [
        reactor.listenTCP(s.allowed_port, site, interface="127.0.0.1"),
        reactor.listenTCP(s.denied_port, site, interface="127.0.0.1"),
    ]
    try:
        with tempfile.TemporaryDirectory(prefix="kvha-chromium-") as profile:
            allowed = yield threads.deferToThread(
                _dump_dom, chromium, f"{s.allowed}/allowed.html", profile
            )
        with tempfile.TemporaryDirectory(prefix="kvha-chromium-") as profile:
            denied = yield threads.deferToThread(
                _dump_dom, chromium, f"http://127.0.0.1:{s.denied_port}/denied.html", profile
            )
    finally:
        for port in ports:
            yield port.stopListening()
        shutil.rmtree(pages, ignore_errors=True)
    assert _text(allowed, "read") == "READ seeded by urllib", allowed
    assert _text(allowed, "result") == "OK 200 200 200 fetched in Chromium true", allowed
    assert _text(denied, "read") == "BLOCKED TypeError", denied
    assert _text(denied, "result").startswith("FAILED TypeError"), denied
    # The browser sent the allowed page's writes and blocked the other page's PUT at preflight.
    status, doc = yield threads.deferToThread(s.http.json, "GET", K + "from-browser")
    assert status == 200 and doc["value"] == "fetched in Chromium" and doc["flags"] == 0
    status, _ = yield threads.deferToThread(s.http.json, "GET", K + "from-elsewhere")
    assert status == 404
