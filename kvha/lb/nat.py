"""Kernel forwarding of the VIP (``forward: kernel``): nftables DNAT, as LVS-NAT was for the seeds.

With ``forward: proxy`` (the default) every byte between a client and a
master passes through the load balancer's Python process: a ``recv()`` and a
``send()`` per direction.  With ``forward: kernel`` the ACTIVE load balancer
writes an nftables table instead, and the kernel rewrites the destination of
each new connection to the VIP to a live master (DNAT); the connection then
never reaches the load balancer's process at all.

The table, one per load balancer, is rewritten as a whole in one ``nft -f``
transaction whenever the set of live masters changes (a health check flips
one, or a master is added, drained or removed)::

    table ip kvha_<vip>_<lb id> {
      chain vip { ip daddr VIP tcp dport 6379 dnat to numgen inc mod 2 map {...} ... }
      chain prerouting { type nat hook prerouting ...; jump vip }  # clients elsewhere
      chain output { type nat hook output ...; jump vip }          # clients on this host
      chain postrouting { ... ct original ip daddr VIP ... masquerade }
    }

``rr`` is ``numgen inc`` over the live masters; ``wrr`` is ``numgen random``
over ranges sized by weight; ``leastconn`` needs the connection counts that
only the proxy has, so the configuration refuses it.  Connections already
open keep their master (conntrack) when the table changes, which is what a
drain wants; after ``drain_timeout``, or when a master is removed, their
conntrack entries are deleted (``conntrack -D``) and they die with a reset.

What the kernel cannot do that the proxy does: try the next master when one
refuses a connection (clients of a master that has just died get a refused
or reset connection until the load balancer sees it: at once for a process
that dies, see ``watch.py``; after ``fall`` x ``interval`` health checks for
a host that vanishes), and count connections for ``leastconn``.  Masters on another
host are reached through masquerading, so the load balancer needs
``net.ipv4.ip_forward`` (set when the VIP is taken in ``ip`` mode); a master
on 127.0.0.0/8 is reachable only from clients on the load balancer's host.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from typing import Callable, Optional

from twisted.logger import Logger

from kvha.config import is_ipv4
from kvha.lb.pool import Backend, Pool

log = Logger()

#: nft's largest useful ``numgen random mod``: weights are scaled into it.
WRR_SLOTS = 1000

Runner = Callable[[list[str], Optional[bytes]], str]


def run_tool(argv: list[str], stdin: Optional[bytes] = None) -> str:
    """Run ``nft`` or ``conntrack``; raise ``CalledProcessError`` with its stderr on failure."""
    result = subprocess.run(argv, input=stdin, capture_output=True, timeout=5, check=True)
    return (result.stdout + result.stderr).decode(errors="replace")


def _name_part(text: str) -> str:
    """``text`` in the characters of an nft name, one to one: ``-`` is ``_2d``, ``_`` ``_5f``."""
    return re.sub(r"[^A-Za-z0-9]", lambda m: f"_{ord(m.group()):02x}", text)


def kernel_unavailable(run: Optional[Runner] = None) -> str:
    """Why this process cannot write nftables tables, or "" if it can."""
    try:
        (run or run_tool)(["nft", "list", "tables", "ip"], None)
    except FileNotFoundError:
        return "nft is not installed (Debian: apt-get install nftables)"
    except subprocess.CalledProcessError as e:
        return f"nft does not work here (it needs root): {_why(e)}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"nft could not run: {e}"
    return ""


def table_prefix(vip: str) -> str:
    """What every load balancer's table for ``vip`` is named after."""
    return f"kvha_{vip.replace('.', '_')}_"  # an IPv4 address: digits and dots


def weighted_ranges(weights: list[float], slots: int = WRR_SLOTS) -> list[tuple[int, int]]:
    """Split ``0..slots-1`` into one inclusive range per weight, sized in proportion.

    Every positive weight gets at least one slot; the ranges cover every slot.
    """
    total = sum(weights)
    counts = [max(1, round(slots * w / total)) for w in weights]
    counts[-1] += slots - sum(counts)  # rounding leftovers go to the last one
    while counts[-1] < 1:  # so many tiny weights that the last one went negative
        i = counts.index(max(counts))
        counts[i] -= 1
        counts[-1] += 1
    ranges, start = [], 0
    for n in counts:
        ranges.append((start, start + n - 1))
        start += n
    return ranges


class KernelForwarder:
    """The nftables table of one load balancer: written while ACTIVE, deleted when not."""

    def __init__(
        self,
        lb_id: str,
        vip: str,
        ports: dict[str, int],
        pool: Pool,
        mode: str = "bind",
        run: Runner = run_tool,
        sysctl: Optional[Callable[[str, str], None]] = None,
    ) -> None:
        self.vip = vip
        self.ports = dict(ports)  # protocol -> VIP port
        self.pool = pool
        self.mode = mode
        self.run = run
        self.sysctl = sysctl if sysctl is not None else write_sysctl
        self.prefix = table_prefix(vip)
        self.table = self.prefix + _name_part(lb_id)
        self.held = False
        #: The ruleset last written, or None when the table is not ours to keep.
        self.applied: Optional[str] = None
        self.failed = ""
        self._conntrack_missing = False
        self._warned: set[str] = set()

    # The ruleset ------------------------------------------------------------------------

    def targets(self, proto: str) -> list[Backend]:
        """Masters that may take new connections (a host that is no IPv4 address cannot)."""
        live = []
        for b in self.pool.candidates(proto):
            if is_ipv4(b.host):
                live.append(b)
            elif b.id not in self._warned:
                self._warned.add(b.id)
                log.error(
                    "master {m} left out of the kernel table: host {host!r} is not an IPv4 address",
                    m=b.id,
                    host=b.host,
                )
        return live

    def rule(self, proto: str, port: int) -> Optional[str]:
        live = self.targets(proto)
        if not live:
            # No rule: the connection reaches this host's own stack, where
            # nothing listens on the VIP port, and is refused at once.
            return None
        match = f"ip daddr {self.vip} tcp dport {port}"
        dests = [f"{b.host} . {b.ports[proto]}" for b in live]
        if len(live) == 1:
            b = live[0]
            return f"{match} dnat to {b.host}:{b.ports[proto]}"
        if self.pool.scheduler == "wrr":
            ranges = weighted_ranges([b.weight for b in live])
            entries = ", ".join(f"{lo}-{hi} : {d}" for (lo, hi), d in zip(ranges, dests))
            return f"{match} dnat to numgen random mod {WRR_SLOTS} map {{ {entries} }}"
        entries = ", ".join(f"{i} : {d}" for i, d in enumerate(dests))
        return f"{match} dnat to numgen inc mod {len(live)} map {{ {entries} }}"

    def ruleset(self) -> str:
        """The whole table, as one ``nft -f`` transaction that replaces any earlier one."""
        t = self.table
        rules = [r for proto, port in self.ports.items() if (r := self.rule(proto, port))]
        body = "".join(f"    {r}\n" for r in rules)
        return (
            f"table ip {t}\ndelete table ip {t}\n"
            f"table ip {t} {{\n"
            f"  chain vip {{\n{body}  }}\n"
            "  chain prerouting {\n"
            "    type nat hook prerouting priority dstnat; policy accept;\n"
            "    jump vip\n  }\n"
            "  chain output {\n"
            "    type nat hook output priority -100; policy accept;\n"
            "    jump vip\n  }\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    ct status dnat ct original ip daddr {self.vip} oifname != "lo" masquerade\n'
            "  }\n}\n"
        )

    # Holding it ---------------------------------------------------------------------------

    def tables(self) -> list[str]:
        """Every kvha table for this VIP that the kernel holds (ours and a peer's)."""
        out = self.run(["nft", "list", "tables", "ip"], None)
        names = [line.split()[-1] for line in out.splitlines() if line.startswith("table ip ")]
        return [n for n in names if n.startswith(self.prefix)]

    def acquire(self) -> None:
        """Take the VIP's traffic: write our table, and drop any other kvha table for the VIP.

        On one host (``bind`` mode) the peer's table may still be there: a
        peer killed with -9, or one that is about to yield.  Whoever is ACTIVE
        owns the VIP, so its table is the only one.
        """
        self.held = True
        if self.mode == "ip":
            try:
                self.sysctl("net/ipv4/ip_forward", "1")
            except OSError as e:
                log.error("could not turn on ip_forward: {why}", why=str(e))
        self.sync(force=True)

    def sync(self, force: bool = False) -> bool:
        """Rewrite the table if the live masters changed.  False if ``nft`` failed."""
        if not self.held:
            return True
        try:
            text = self.ruleset()
            if text == self.applied and not force:
                return True
            stale = [n for n in self.tables() if n != self.table]
            # "table X" first makes "delete table X" succeed even when X went in
            # the meantime (the peer deleting its own as it stops); a delete of a
            # missing table would abort the whole transaction.
            script = "".join(f"table ip {n}\ndelete table ip {n}\n" for n in stale) + text
            self.run(["nft", "-f", "-"], script.encode())
        except (OSError, ValueError, ArithmeticError, subprocess.SubprocessError) as e:
            self.failed = _why(e)
            self.applied = None
            log.error("nft could not write table {t}: {why}", t=self.table, why=self.failed)
            return False
        if stale:
            log.info("dropped the stale VIP table(s) {names}", names=", ".join(stale))
        if self.applied is None or self.failed:
            log.info("kernel forwarding of VIP {vip} in table {t}", vip=self.vip, t=self.table)
        self.failed = ""
        self.applied = text
        return True

    def release(self, keep: bool = False) -> None:
        """Stop forwarding.  ``keep``: leave the table for a live peer to replace.

        Deleting the last nat table unregisters the kernel's NAT hooks, and
        the kernel then drops the address translation of every open
        connection: they all break.  The peer's acquire deletes our table and
        writes its own in one transaction, which keeps the hooks and the open
        connections; so a load balancer handing over to a live peer leaves
        its table for that.
        """
        self.held = False
        self.applied = None
        if keep:
            log.info("leaving table {t} for the peer to replace", t=self.table)
            return
        self.drop_own()

    def drop_own(self) -> None:
        """Delete our table if it is there (a no-op otherwise)."""
        try:
            if self.table in self.tables():
                self.run(["nft", "delete", "table", "ip", self.table], None)
                log.info(
                    "deleted table {t}: no longer forwarding VIP {vip}", t=self.table, vip=self.vip
                )
        except (OSError, subprocess.SubprocessError) as e:
            log.error("nft could not delete table {t}: {why}", t=self.table, why=_why(e))

    # Open connections -----------------------------------------------------------------------

    def close_connections(self, backend: Backend) -> Optional[int]:
        """Delete the conntrack entries of the VIP's connections to ``backend``.

        Their next packets find no translation, and both ends get a reset.
        Returns how many were deleted, or None without the ``conntrack`` tool.
        """
        total = 0
        for proto, vip_port in self.ports.items():
            port = backend.ports.get(proto)
            if port is None:
                continue
            argv = ["conntrack", "-D", "-p", "tcp", "--orig-dst", self.vip]
            argv += ["--orig-port-dst", str(vip_port)]
            argv += ["--reply-src", backend.host, "--reply-port-src", str(port)]
            try:
                total += _deleted(self.run(argv, None))
            except FileNotFoundError:
                if not self._conntrack_missing:
                    log.error(
                        "conntrack is not installed: connections to {m} stay open", m=backend.id
                    )
                self._conntrack_missing = True
                return None
            except subprocess.CalledProcessError as e:
                # conntrack exits 1 when nothing matched.
                total += _deleted((e.stderr or b"").decode(errors="replace"))
                continue
            except (OSError, subprocess.SubprocessError) as e:
                log.error("conntrack -D failed: {why}", why=_why(e))
                continue
        return total

    def connection_counts(self, backends: Iterable[Backend]) -> dict[str, dict[str, int]]:
        """Open VIP connections per master and protocol, from conntrack (empty without it)."""
        counts: dict[str, dict[str, int]] = {}
        try:
            out = self.run(["conntrack", "-L", "-p", "tcp", "--orig-dst", self.vip], None)
        except (OSError, subprocess.SubprocessError):
            return counts
        where = {}
        for b in backends:
            for proto, port in b.ports.items():
                where[(b.host, port)] = (b.id, proto)
        for line in out.splitlines():
            if "ESTABLISHED" not in line:
                continue
            # The second src=/sport= pair is the reply direction: the master.
            srcs = re.findall(r"src=(\S+)", line)
            sports = re.findall(r"sport=(\d+)", line)
            if len(srcs) < 2 or len(sports) < 2:
                continue
            hit = where.get((srcs[1], int(sports[1])))
            if hit is not None:
                per = counts.setdefault(hit[0], {})
                per[hit[1]] = per.get(hit[1], 0) + 1
        return counts


def _deleted(output: str) -> int:
    found = re.search(r"(\d+) flow entries have been deleted", output)
    return int(found.group(1)) if found else 0


def _why(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        return (e.stderr or b"").decode(errors="replace").strip() or str(e)
    return str(e)


def write_sysctl(name: str, value: str) -> None:
    path = "/proc/sys/" + name
    with open(path) as f:
        if f.read().strip() == value:
            return
    with open(path, "w") as f:
        f.write(value)
    log.info("set {name} = {value}", name=name.replace("/", "."), value=value)
