"""Start, watch and stop kvha ``twistd`` processes on this machine.

Used by the process tests, the benchmarks and (later) ``kvha up``: each node
is a real ``twistd -n kvha-<role> --config FILE`` child whose pid we own, so
it can be stopped cleanly or killed with SIGKILL in the middle of a load.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

#: The source tree; children import kvha and its twistd plugin from here.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: Heap bound for PyPy masters and load balancers that kvha starts (when the
#: environment sets none).  Left alone, PyPy's collector let a master under
#: sustained load grow to about 1.2 GB resident; bounded at 250 MB it held
#: 450 MB at the same throughput.  Data nodes get no bound: their heap holds
#: the data, and a bound would turn a full heap into MemoryError.
PYPY_GC_MAX_DEFAULT = "300MB"


def node_environment(
    role: str, python: str, base: Optional[dict[str, str]] = None
) -> dict[str, str]:
    """The environment of a ``kvha-<role>`` child run by ``python``."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = SOURCE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if role in ("master", "lb") and "PYPY_GC_MAX" not in env and _is_pypy(python):
        env["PYPY_GC_MAX"] = PYPY_GC_MAX_DEFAULT
    return env


def _is_pypy(python: str) -> bool:
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return sys.implementation.name == "pypy"
    return "pypy" in os.path.basename(os.path.realpath(python))


_handed_out: set[int] = set()
_port_rng = random.Random()


def _ephemeral_low() -> int:
    """The first port the kernel picks for outgoing connections (Linux), or 32768."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", rng: Optional[random.Random] = None) -> int:
    """A TCP port that nothing listens on right now, and that no other call returned.

    Chosen below the kernel's ephemeral range: a port from that range (what
    binding to port 0 gives) can be taken by any outgoing connection between
    this call and the server's bind, which made tests fail now and then with
    "Address already in use".
    """
    rng = rng if rng is not None else _port_rng
    high = min(_ephemeral_low(), 65536) - 1
    for _ in range(200):
        port = rng.randint(10000, high) if high > 10000 else 0
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class NodeProcess:
    """One ``twistd -n`` child: start, wait until it listens, stop or kill -9."""

    def __init__(
        self,
        role: str,
        config_path: str,
        log_path: str,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        python: str = sys.executable,
    ) -> None:
        self.role = role
        self.config_path = config_path
        self.log_path = log_path
        self.host = host
        self.port = port
        self.python = python
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True, timeout: float = 20.0) -> None:
        env = node_environment(self.role, self.python)
        cmd = [
            os.path.join(os.path.dirname(self.python), "twistd"),
            "--nodaemon",
            "--reactor=kvha",
            "--pidfile=",
            "--logfile",
            self.log_path,
            f"kvha-{self.role}",
            "--config",
            self.config_path,
        ]
        # twistd prints usage and config errors on stdout; both streams go to a
        # file beside the log (a pipe nobody drains could fill and stall the node).
        self.output_path = self.log_path + ".out"
        with open(self.output_path, "wb") as output:
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        if wait and self.port is not None:
            try:
                self._wait_listening(timeout)
            except Exception:
                self.kill()
                raise

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None and self.port is not None
        while True:
            if self.proc.poll() is not None:
                err = self.output()
                raise RuntimeError(
                    f"kvha-{self.role} exited with {self.proc.returncode}: {err}\n{self.log()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"kvha-{self.role} did not listen on {self.port}") from None
                time.sleep(0.05)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no clean-up runs, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def output(self) -> str:
        """What the process wrote on stdout and stderr."""
        try:
            with open(self.output_path, errors="replace") as f:
                return f.read()
        except (OSError, AttributeError):
            return ""
