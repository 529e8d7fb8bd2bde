"""The ``kvha`` command line: one argparse subcommand per task.

Each command group registers itself through an ``_add_<group>`` function that
attaches a parser and a handler (``set_defaults(func=...)``); ``main`` only
parses and dispatches.  Adding a command means writing one more such
function and listing it in ``_COMMANDS``.  Handlers take the parsed arguments and return
the exit status, so ``main`` is callable from tests without spawning a process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional

from kvha import __version__
from kvha.config import ConfigError, load_config


def _config_check(args: argparse.Namespace) -> int:
    """Validate each file; the status says whether all of them are usable."""
    status = 0
    for path in args.files:
        try:
            config = load_config(path)
        except ConfigError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            status = 1
        else:
            print(f"{path}: ok (role {config.role})")
    return status


def _add_config(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("config", help="work with configuration files")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate configuration files")
    check.add_argument("files", nargs="+", metavar="FILE", help="YAML configuration file")
    check.set_defaults(func=_config_check)


DEFAULT_LOCAL = "etc/local.yaml"


def _local(path: str) -> Any:
    config = load_config(path)
    if config.local is None:
        raise ConfigError((), f"{path} is a {config.role} configuration; expected `local:`")
    return config.local


def _up(args: argparse.Namespace) -> int:
    from kvha.local import up

    try:
        local = _local(args.file)
    except ConfigError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    return up(local, args.file, timeout=args.timeout)


def _status(args: argparse.Namespace) -> int:
    from kvha.local import node_status, plan, status_table

    try:
        local = _local(args.file)
    except ConfigError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    rows = [node_status(local, node) for node in plan(local)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(status_table(rows))
    return 0 if all(r["state"] in ("up", "ACTIVE", "BACKUP") for r in rows) else 3


def _admin_targets(args: argparse.Namespace) -> tuple[list[str], str]:
    """Admin URLs (active first when known) and the token."""
    if args.admin:
        return [args.admin], args.token or ""
    from kvha.local import plan

    local = _local(args.file)
    urls = [f"http://{n.host}:{n.port}" for n in plan(local) if n.role == "lb"]
    return urls, args.token or local.admin_token


def _admin(args: argparse.Namespace, method: str, path: str, body: Optional[dict] = None) -> Any:
    from kvha.local import admin_call

    urls, token = _admin_targets(args)
    last: Optional[Exception] = None
    for url in urls:
        try:
            return admin_call(url, token, method, path, body)
        except OSError as e:  # that load balancer is down: try the other
            last = e
    raise RuntimeError(f"no load balancer answered: {last}")


def _lb_status(args: argparse.Namespace) -> int:
    from kvha.local import admin_call

    try:
        urls, token = _admin_targets(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    out = []
    for url in urls:
        try:
            out.append(admin_call(url, token, "GET", "/v1/status"))
        except (OSError, RuntimeError) as e:
            out.append({"admin": url, "state": "unreachable", "error": str(e)})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for st in out:
        if st.get("state") == "unreachable":
            print(f"{st['admin']}: unreachable ({st['error']})")
            continue
        vip = "holds the VIP " + st["vip"] if st["holds_vip"] else "standby"
        if st.get("forward") in ("kernel", "handoff"):
            vip += f" ({st['forward']} forwarding)"
        print(f"{st['id']}: {st['state']} (priority {st['priority']}), {vip}, epoch {st['epoch']}")
        for m in st["masters"]:
            health = ", ".join(f"{p} {'up' if ok else 'DOWN'}" for p, ok in m["up"].items())
            drain = " draining" if m["draining"] else ""
            conns = sum(m["connections"].values())
            print(f"  {m['id']:<10} {m['host']:<15} {health}; {conns} connections{drain}")
    return 0


def _master(args: argparse.Namespace) -> int:
    try:
        if args.action == "list":
            doc = _admin(args, "GET", "/v1/masters")
        elif args.action == "add":
            body: dict[str, Any] = {"id": args.id, "host": args.host, "weight": args.weight}
            for proto in ("redis", "memcached", "http"):
                if getattr(args, proto):
                    body[proto] = getattr(args, proto)
            if args.handoff:
                body["handoff"] = os.path.abspath(args.handoff)
            doc = _admin(args, "POST", "/v1/masters", body)
        elif args.action == "drain":
            doc = _admin(args, "POST", f"/v1/masters/{args.id}/drain")
        else:
            doc = _admin(args, "DELETE", f"/v1/masters/{args.id}")
    except (RuntimeError, ConfigError) as e:
        print(f"kvha master {args.action}: {e}", file=sys.stderr)
        return 1
    print(f"epoch {doc['epoch']}")
    for m in doc.get("masters", []):
        ports = " ".join(f"{p}={n}" for p, n in m["ports"].items())
        print(f"  {m['id']:<10} {m['host']:<15} {ports}{' draining' if m['draining'] else ''}")
    return 0


def _master_targets(args: argparse.Namespace) -> tuple[list[str], str]:
    """Masters' HTTP base URLs (``--master``, or every master of ``--file``) and the token."""
    from kvha.local import plan

    if args.master:
        return [args.master], args.token or ""
    local = _local(args.file)
    urls = [
        f"http://{n.extra_ports[1][1]}:{n.extra_ports[1][2]}"
        for n in plan(local)
        if n.role == "master"
    ]
    return urls, args.token or local.admin_token


def _node(args: argparse.Namespace) -> int:
    from kvha.local import admin_call

    try:
        urls, token = _master_targets(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.action == "add":
        body = {
            "id": args.id,
            "address": args.address,
            "weight": args.weight,
            "read_weight": args.read_weight,
        }
        method, path = "POST", "/v1/admin/nodes"
    else:
        body, method, path = None, "DELETE", f"/v1/admin/nodes/{args.id}"
    last: Optional[Exception] = None
    for url in urls:
        try:
            doc = admin_call(url, token, method, path, body)
        except OSError as e:
            last = e
            continue
        except RuntimeError as e:
            print(f"kvha node {args.action}: {e}", file=sys.stderr)
            return 1
        pending = doc.get("pending")
        what = f"; {pending['kind']} of {pending['node']} in progress" if pending else ""
        print(f"cluster map epoch {doc['epoch']}{what} (watch it with `kvha status`)")
        return 0
    print(f"kvha node {args.action}: no master answered: {last}", file=sys.stderr)
    return 1


def _read_password(args: argparse.Namespace) -> Optional[str]:
    """The password from --password-file, --password-stdin or --password (None if none given)."""
    if getattr(args, "password_file", None):
        with open(args.password_file, encoding="utf-8") as f:
            return f.read().strip()
    if getattr(args, "password_stdin", False):
        return sys.stdin.readline().rstrip("\r\n")
    password: Optional[str] = getattr(args, "password", None)
    return password


def _partition_body(args: argparse.Namespace) -> dict[str, Any]:
    """The admin API body of ``partition create`` / ``set`` from the options given.

    Sizes and durations go as written ("64MiB", "1h"): the master validates
    them exactly as it validates its configuration file.
    """
    body: dict[str, Any] = {}
    password = _read_password(args)
    if password is not None:
        body["password"] = password
    if getattr(args, "no_password", False):
        body["password"] = None
    if args.anonymous is not None:
        body["anonymous"] = args.anonymous
    if args.max_bytes is not None:
        body["max_bytes"] = args.max_bytes
    if getattr(args, "unlimited", False):
        body["max_bytes"] = None
    for name in ("policy", "default_ttl", "write_acks", "read"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    return body


def _show_size(n: Optional[int]) -> str:
    if n is None:
        return "unlimited"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _partition(args: argparse.Namespace) -> int:
    from kvha.local import admin_call

    if args.action == "hash":
        from kvha.passwords import hash_password

        password = _read_password(args)
        if password is None:
            import getpass

            password = getpass.getpass("partition password: ")
        if len(password) < 8:
            print("kvha partition hash: the password needs at least 8 characters", file=sys.stderr)
            return 1
        print(hash_password(password))
        return 0
    try:
        urls, token = _master_targets(args)
        if args.action == "list":
            method, path, body = "GET", "/v1/admin/partitions", None
        elif args.action == "create":
            body = _partition_body(args)
            body["name"] = args.name
            method, path = "POST", "/v1/admin/partitions"
        elif args.action == "set":
            body = _partition_body(args)
            if not body:
                print("kvha partition set: nothing to change", file=sys.stderr)
                return 1
            method, path = "PATCH", f"/v1/admin/partitions/{args.name}"
        else:
            method, path, body = "DELETE", f"/v1/admin/partitions/{args.name}", None
    except (ConfigError, OSError) as exc:
        print(f"kvha partition {args.action}: {exc}", file=sys.stderr)
        return 1
    last: Optional[Exception] = None
    for url in urls:
        try:
            doc = admin_call(url, token, method, path, body)
        except OSError as e:
            last = e
            continue
        except RuntimeError as e:
            print(f"kvha partition {args.action}: {e}", file=sys.stderr)
            return 1
        if args.action != "list":
            done = {"create": "created", "set": "changed", "delete": "deleted"}[args.action]
            print(f"cluster map epoch {doc['epoch']}: partition {args.name} {done}")
            return 0
        if args.json:
            print(json.dumps(doc, indent=2))
            return 0
        print(f"cluster map epoch {doc['epoch']}")
        print(
            f"  {'name':<16} {'password':<8} {'anon':<5} {'used':>10} {'max':>10} {'when full':<9} "
            f"{'ttl':>8} {'keys':>9}  acks/read"
        )
        for p in doc["partitions"]:
            print(
                f"  {p['name']:<16} {'yes' if p['has_password'] else 'no':<8} "
                f"{'yes' if p['anonymous'] else 'no':<5} {_show_size(p['used_bytes']):>10} "
                f"{_show_size(p['max_bytes']):>10} {p['policy']:<9} "
                f"{(str(p['default_ttl']) + 's') if p['default_ttl'] else '-':>8} "
                f"{p['keys']:>9}  {p['write_acks']}/{p['read']}"
            )
        return 0
    print(f"kvha partition {args.action}: no master answered: {last}", file=sys.stderr)
    return 1


def _add_partition(commands: argparse._SubParsersAction) -> None:
    partition = commands.add_parser(
        "partition", help="partitions: credentials, quotas, TTLs (the cluster admin API)"
    )
    actions = partition.add_subparsers(dest="action", metavar="ACTION", required=True)

    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--file", default=DEFAULT_LOCAL, help="local cluster file")
        p.add_argument("--master", help="a master's HTTP base URL (default: from --file)")
        p.add_argument("--token", help="cluster admin token (default: from --file)")

    def password(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--password", help="the password (visible to ps; prefer the others)")
        group.add_argument("--password-file", help="read the password from this file")
        group.add_argument(
            "--password-stdin", action="store_true", help="read the password from stdin"
        )

    def settings(p: argparse.ArgumentParser) -> None:
        anon = p.add_mutually_exclusive_group()
        anon.add_argument("--anonymous", dest="anonymous", action="store_true", default=None)
        anon.add_argument("--no-anonymous", dest="anonymous", action="store_false")
        p.add_argument("--max-bytes", help="quota, e.g. 64MiB (one copy counted)")
        p.add_argument("--policy", choices=("reject", "evict"), help="when full")
        p.add_argument("--default-ttl", help="expiry of records written without one, e.g. 1h")
        p.add_argument("--write-acks", choices=("all", "quorum", "one"))
        p.add_argument("--read", choices=("one", "quorum"))

    p = actions.add_parser("list", help="every partition with its usage")
    target(p)
    p.add_argument("--json", action="store_true")
    p = actions.add_parser("create", help="add a partition")
    target(p)
    p.add_argument("name")
    password(p)
    settings(p)
    p = actions.add_parser("set", help="change a partition's settings")
    target(p)
    p.add_argument("name")
    password(p)
    p.add_argument("--no-password", action="store_true", help="remove the password")
    p.add_argument("--unlimited", action="store_true", help="remove the quota")
    settings(p)
    p = actions.add_parser("delete", help="remove a partition and its records")
    target(p)
    p.add_argument("name")
    p = actions.add_parser("hash", help="print a password hash for master.cluster.partitions")
    password(p)
    partition.set_defaults(func=_partition)


def _add_cluster(commands: argparse._SubParsersAction) -> None:
    up = commands.add_parser("up", help="run a whole cluster on this machine")
    up.add_argument("file", nargs="?", default=DEFAULT_LOCAL, help="local cluster file")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to become healthy")
    up.set_defaults(func=_up)
    status = commands.add_parser("status", help="show every node of the local cluster")
    status.add_argument("file", nargs="?", default=DEFAULT_LOCAL)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    def admin_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--file", default=DEFAULT_LOCAL, help="local cluster file")
        p.add_argument("--admin", help="a load balancer's admin URL (default: from --file)")
        p.add_argument("--token", help="admin bearer token (default: from --file)")

    lb = commands.add_parser("lb", help="load balancers")
    lb_actions = lb.add_subparsers(dest="action", metavar="ACTION", required=True)
    lb_status = lb_actions.add_parser("status", help="state of both load balancers")
    admin_options(lb_status)
    lb_status.add_argument("--json", action="store_true")
    lb_status.set_defaults(func=_lb_status)

    master = commands.add_parser("master", help="masters behind the VIP")
    actions = master.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser("list", help="the master list")
    admin_options(p)
    p = actions.add_parser("add", help="add a master at run time")
    admin_options(p)
    p.add_argument("id")
    p.add_argument("host")
    p.add_argument("--redis", type=int)
    p.add_argument("--memcached", type=int)
    p.add_argument("--http", type=int)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument(
        "--handoff",
        metavar="PATH",
        help="the master's handoff socket, if it runs on the load balancers' host "
        "(forward: handoff hands its connections over there)",
    )
    for name in ("drain", "remove"):
        p = actions.add_parser(name, help=f"{name} a master")
        admin_options(p)
        p.add_argument("id")
    master.set_defaults(func=_master)

    node = commands.add_parser("node", help="add or remove data nodes (Automatic Scaling)")
    node_actions = node.add_subparsers(dest="action", metavar="ACTION", required=True)

    def master_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--file", default=DEFAULT_LOCAL, help="local cluster file")
        p.add_argument("--master", help="a master's HTTP base URL (default: from --file)")
        p.add_argument("--token", help="cluster admin token (default: from --file)")

    p = node_actions.add_parser("add", help="add a data node: it joins and its ranges move")
    master_options(p)
    p.add_argument("id")
    p.add_argument("address", help="client endpoint, e.g. tcp:127.0.0.1:7104")
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--read-weight", type=float, default=1.0)
    p = node_actions.add_parser("remove", help="remove a data node: its ranges move away")
    master_options(p)
    p.add_argument("id")
    node.set_defaults(func=_node)


def bench_steps(args: argparse.Namespace, python: str, root: str) -> list[list[str]]:
    """The commands ``kvha bench`` runs, in order (``make bench`` runs the same)."""
    import platform

    bench = os.path.join(root, "bench")
    run = [python, os.path.join(bench, "run.py")]
    if args.sections:
        run += ["--sections", args.sections]
    if args.quick:
        run.append("--quick")
    if args.repeats is not None:
        run += ["--repeats", str(args.repeats)]
    if args.requests is not None:
        run += ["--requests", str(args.requests)]
    steps = [run]
    if args.quick:
        return steps  # a quick look: no storage bench, and the hotpath figures stay
    storage = [python, os.path.join(bench, "storage.py")]
    if args.big:
        storage.append("--big")
    steps.append(storage)
    stem = "hotpath-pypy" if platform.python_implementation() == "PyPy" else "hotpath"
    for replicas in (0, 1):
        out = os.path.join(bench, "results", f"{stem}-r{replicas}.json")
        steps.append(
            [python, os.path.join(bench, "hotpath.py"), "--replicas", str(replicas), "--out", out]
        )
    return steps


def _bench(args: argparse.Namespace) -> int:
    """Run the benchmark of ``bench/`` (needs the source tree, redis-server, memcached)."""
    import subprocess

    from kvha.procs import SOURCE_ROOT

    if not os.path.isfile(os.path.join(SOURCE_ROOT, "bench", "run.py")):
        print(
            f"kvha bench needs kvha's source tree (bench/ is not in {SOURCE_ROOT}); "
            "run it from a clone, or use `make bench` there",
            file=sys.stderr,
        )
        return 1
    env = dict(os.environ)
    env["PYTHONPATH"] = SOURCE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for step in bench_steps(args, sys.executable, SOURCE_ROOT):
        step_env = env
        if step[1].endswith("hotpath.py"):
            # Random hash seeds moved hotpath runs of the same code by up to a third.
            step_env = dict(env, PYTHONHASHSEED="0")
        print("+ " + " ".join(step), flush=True)
        if args.dry_run:
            continue
        code = subprocess.run(step, env=step_env, cwd=SOURCE_ROOT).returncode
        if code:
            return code
    return 0


def _add_bench(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmark kvha beside redis-server and memcached (what `make bench` runs)",
        description="Runs bench/run.py (data node, protocols against redis-server and "
        "memcached, memory), bench/storage.py and bench/hotpath.py under this Python, "
        "and writes bench/results/.  Needs the source tree, redis-server, redis-benchmark, "
        "memcached and memcslap.",
    )
    bench.add_argument(
        "--sections", help="bench/run.py sections, comma-separated: data,protocols,memory"
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="protocols with replicas 1 only; no storage bench and no hotpath run",
    )
    bench.add_argument("--repeats", type=int, help="runs per figure (default 3)")
    bench.add_argument(
        "--requests", type=int, help="redis-benchmark -n per kvha test (default 100,000)"
    )
    bench.add_argument("--big", action="store_true", help="storage: add 1 GB of 10 KiB values")
    bench.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    bench.set_defaults(func=_bench)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_config,
    _add_cluster,
    _add_partition,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    """The full parser; separate from ``main`` so tests and docs can inspect it."""
    parser = argparse.ArgumentParser(prog="kvha", description="kvha key-value store")
    parser.add_argument("--version", action="version", version=f"kvha {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; returns the exit status instead of exiting."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
