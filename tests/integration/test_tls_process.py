"""TLS on the client ports and on the internal port, with certificates the test makes.

A throwaway CA signs one certificate for 127.0.0.1.  Three data nodes listen
with ``ssl:``; a master reaches them with ``ssl:...:caCertsDir=...:hostname=``
and serves memcached, Redis and HTTP over TLS.  redis-py, a TLS socket and
urllib (HTTPS) then use it; plaintext clients get nowhere.  A second master
that trusts a different CA refuses the data nodes' certificate and never
sees them up.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import pytest
import redis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvha.procs import NodeProcess, free_port
from tests.conftest import SECRET, NodeFactory

pytestmark = pytest.mark.process

TIMEOUT = 3.0


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_pki(directory: str, label: str) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 it signed; returns the file paths."""
    os.makedirs(os.path.join(directory, "ca"), exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"kvha test CA {label}"))
        .issuer_name(_name(f"kvha test CA {label}"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca_dir": os.path.join(directory, "ca"),
        "ca": os.path.join(directory, "ca", "ca.pem"),
        "cert": os.path.join(directory, "server-cert.pem"),
        "key": os.path.join(directory, "server-key.pem"),
    }
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(paths["key"], 0o600)
    return paths


def tls_listen(port: int, pki: dict[str, str]) -> str:
    return f"ssl:{port}:interface=127.0.0.1:privateKey={pki['key']}:certKey={pki['cert']}"


def tls_address(port: int, pki: dict[str, str]) -> str:
    return f"ssl:host=127.0.0.1:port={port}:caCertsDir={pki['ca_dir']}:hostname=127.0.0.1"


def write(
    nodes: NodeFactory, name: str, role: str, section: dict[str, Any], port: int
) -> NodeProcess:
    path = os.path.join(nodes.tmp_path, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({role: section}, f, sort_keys=False)
    node = NodeProcess(role, path, os.path.join(nodes.tmp_path, f"{name}.log"), port=port)
    nodes.nodes.append(node)
    return node


def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except (OSError, ValueError) as e:
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


def https_json(url: str, context: ssl.SSLContext) -> tuple[int, Any]:
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_tls_on_client_ports_and_between_nodes(nodes: NodeFactory) -> None:
    """Everything over TLS works with the right CA; plaintext and the wrong CA do not."""
    pki = make_pki(os.path.join(nodes.tmp_path, "pki"), "right")
    other = make_pki(os.path.join(nodes.tmp_path, "pki-other"), "wrong")
    data = []
    for i in (1, 2, 3):
        port = free_port()
        state = os.path.join(nodes.tmp_path, f"data{i}")
        os.makedirs(state, exist_ok=True)
        section = {
            "id": f"data{i}",
            "listen": tls_listen(port, pki),
            "state_dir": state,
            "secret": SECRET,
        }
        data.append(write(nodes, f"data{i}", "data", section, port))
    ports = {"memcached": free_port(), "redis": free_port(), "http": free_port()}

    def master_section(name: str, trust: dict[str, str], client_ports: dict[str, int]) -> dict:
        return {
            "id": name,
            "secret": SECRET,
            "cluster": {
                "replicas": 1,
                "nodes": [
                    {"id": f"data{i + 1}", "address": tls_address(node.port, trust)}  # type: ignore[arg-type]
                    for i, node in enumerate(data)
                ],
            },
            **{proto: {"listen": tls_listen(p, pki)} for proto, p in client_ports.items()},
        }

    master = write(nodes, "master1", "master", master_section("master1", pki, ports), ports["http"])
    wrong_http = free_port()
    wrong = write(
        nodes,
        "master2",
        "master",
        master_section("master2", other, {"http": wrong_http}),
        wrong_http,
    )
    for node in [*data, master, wrong]:
        node.start(wait=False)
    for node in [*data, master, wrong]:
        node._wait_listening(20)

    context = ssl.create_default_context(cafile=pki["ca"])
    health = f"https://127.0.0.1:{ports['http']}/health"
    every_node_up = {"data1": "up", "data2": "up", "data3": "up"}
    # /health answers 200 while a data node that just started is still
    # "merging"; wait for what is asserted next, not merely for the 200.
    wait_until(
        lambda: https_json(health, context)[1].get("data_nodes") == every_node_up,
        15,
        "the master to see its data nodes up",
    )
    status, doc = https_json(health, context)
    assert status == 200
    assert doc["data_nodes"] == every_node_up

    # Redis over TLS (redis-py), memcached over a TLS socket, HTTPS.
    r = redis.Redis(
        host="127.0.0.1",
        port=ports["redis"],
        ssl=True,
        ssl_ca_certs=pki["ca"],
        protocol=2,
        socket_timeout=TIMEOUT,
    )
    assert r.set("greeting", "hello over tls") and r.get("greeting") == b"hello over tls"
    raw = socket.create_connection(("127.0.0.1", ports["memcached"]), timeout=TIMEOUT)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as mc:
        mc.sendall(b"get greeting\r\n")
        reply = b""
        while not reply.endswith(b"END\r\n"):
            reply += mc.recv(4096)
        assert reply == b"VALUE greeting 0 14\r\nhello over tls\r\nEND\r\n"
    status, doc = https_json(f"https://127.0.0.1:{ports['http']}/v1/p/default/k/greeting", context)
    assert status == 200 and doc["value"] == "hello over tls"

    # A client that does not trust the CA refuses the port; plaintext gets no answer.
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context(cafile=other["ca"]).wrap_socket(
            socket.create_connection(("127.0.0.1", ports["redis"]), timeout=TIMEOUT),
            server_hostname="127.0.0.1",
        )
    with socket.create_connection(("127.0.0.1", ports["redis"]), timeout=TIMEOUT) as plain:
        plain.sendall(b"PING\r\n")
        try:
            answer = plain.recv(100)
        except OSError:
            answer = b""
        assert b"PONG" not in answer
    with socket.create_connection(("127.0.0.1", data[0].port), timeout=TIMEOUT) as plain:  # type: ignore[arg-type]
        try:
            first = plain.recv(100)  # a plaintext peer never sees the node's CHALLENGE
        except OSError:
            first = b""
        assert b"data1" not in first

    # The master that trusts another CA never gets past the TLS handshake.
    time.sleep(1.0)
    status, doc = https_json(f"https://127.0.0.1:{wrong_http}/health", context)
    assert status == 503 and set(doc["data_nodes"].values()) == {"down"}
    assert "certificate verify failed" in wrong.log() or "CERTIFICATE_VERIFY_FAILED" in wrong.log()
