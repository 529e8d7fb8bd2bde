"""The benchmark's own measuring pieces (the benchmark itself runs with ``make bench``)."""

from __future__ import annotations

import os
import time

from bench.protocols import CpuProbe, _median_row, cpu_text


def test_cpu_probe_sees_a_busy_process_and_an_idle_one() -> None:
    sleeper = os.fork()
    if sleeper == 0:  # pragma: no cover - the child only sleeps
        time.sleep(5)
        os._exit(0)
    try:
        probe = CpuProbe([("busy", os.getpid()), ("sleeper", sleeper)])
        probe.start()
        deadline = time.monotonic() + 0.5
        n = 0
        while time.monotonic() < deadline:
            n += 1
        cpu = probe.stop()
    finally:
        os.kill(sleeper, 9)
        os.waitpid(sleeper, 0)
    assert cpu["busy"][0] >= 50
    assert cpu["sleeper"][0] <= 5
    assert 0 <= cpu["idle"] <= 100  # the machine's idle share


def test_cpu_text_lists_roles_then_the_machine_idle_share() -> None:
    cpu = {"data": [20, 1, 0], "master": [98], "lb": [40, 1], "idle": 24}
    assert cpu_text(cpu) == "data 20+1+0, master 98, lb 40+1, idle 24"
    assert cpu_text(None) == ""


def test_the_median_run_keeps_its_own_latencies_and_cpu() -> None:
    rows = [
        {"rps": 3.0, "p50": 1.0, "cpu": {"idle": 1}},
        {"rps": 1.0, "p50": 3.0, "cpu": {"idle": 3}},
        {"rps": 2.0, "p50": 2.0, "cpu": {"idle": 2}},
    ]
    row = _median_row(rows)
    assert (row["rps"], row["p50"], row["cpu"]) == (2.0, 2.0, {"idle": 2})
    assert row["runs"] == [3.0, 1.0, 2.0]


def test_the_hot_path_benchmark_runs_every_command_through_real_nodes() -> None:
    """Replies come back from real data nodes over the wire codec, and each figure is a time."""
    from bench.hotpath import Master, measure

    master = Master(replicas=1, clients=3)
    assert master.turn(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n") == 3 * len(b"+OK\r\n")
    assert master.turn(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n") == 3 * len(b"$1\r\nv\r\n")
    stored = [node.store.get(b"default", b"k") for node in master.nodes]
    assert sum(r is not None for r in stored) == 2  # replicas 1: two copies
    mc = Master(replicas=0, clients=2, protocol="memcached")
    assert mc.turn(b"set k 0 0 1\r\nv\r\nget k\r\n") == 2 * len(
        b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"
    )
    figures = measure(replicas=0, clients=2, pipelines=(1, 2), rounds=2, repeats=2)
    assert set(figures) == {"P1", "P2"}
    for row in figures.values():
        assert set(row) == {"SET", "GET", "INCR", "mc set", "mc get"}
        assert all(0 < us < 100_000 for us in row.values())


def test_interleaved_rounds_combine_into_the_median_run_of_each_test() -> None:
    from bench.protocols import combine_memcslap, combine_redis

    rounds = [
        {"set": {"rps": 3.0, "p50": 1.0, "runs": [3.0]}, "get": {"rps": 9.0, "runs": [9.0]}},
        {"set": {"rps": 1.0, "p50": 3.0, "runs": [1.0]}, "get": {"rps": 7.0, "runs": [7.0]}},
        {"set": {"rps": 2.0, "p50": 2.0, "runs": [2.0]}, "get": {"rps": 8.0, "runs": [8.0]}},
    ]
    combined = combine_redis(rounds)
    assert (combined["set"]["rps"], combined["set"]["p50"]) == (2.0, 2.0)
    assert combined["set"]["runs"] == [3.0, 1.0, 2.0]
    assert combined["get"]["rps"] == 8.0 and combined["get"]["runs"] == [9.0, 7.0, 8.0]
    mc = combine_memcslap(
        [
            {"set": 5.0, "set_runs": [5.0], "set_cpu": {"idle": 5}, "get": 1.0, "get_runs": [1.0]},
            {"set": 4.0, "set_runs": [4.0], "set_cpu": {"idle": 4}, "get": 3.0, "get_runs": [3.0]},
            {"set": 6.0, "set_runs": [6.0], "set_cpu": {"idle": 6}, "get": 2.0, "get_runs": [2.0]},
        ]
    )
    assert (mc["set"], mc["set_runs"], mc["set_cpu"]) == (5.0, [5.0, 4.0, 6.0], {"idle": 5})
    assert (mc["get"], mc["get_runs"]) == (2.0, [1.0, 3.0, 2.0])
    assert "get_cpu" not in mc


def test_floor_relay_answers_each_client_as_many_replies_as_it_sent_commands() -> None:
    """bench/floor.py: requests go out in order, once per turn; replies split by count,
    whatever the reads' boundaries, and each client's leave once per turn, as a master's."""
    from twisted.internet.testing import StringTransport as Plain

    from bench.floor import Backend, Client, Link
    from kvha.flush import TurnFlusher

    class StringTransport(Plain):
        def setTcpNoDelay(self, enabled: bool) -> None:
            self.nodelay = enabled

    turn_end: list = []
    link = Link(turn_end.append)
    link.makeConnection(StringTransport())
    clients = []
    for _ in range(2):
        c = Client(link, None)
        c.makeConnection(StringTransport())
        clients.append(c)
    a, b = clients
    set_cmd = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$3\r\nxxx\r\n"
    a.dataReceived(set_cmd * 3)
    b.dataReceived(set_cmd)
    assert len(turn_end) == 1  # one flush per turn
    turn_end.pop()()
    assert link.transport.value() == set_cmd * 4
    backend = Backend()
    backend.makeConnection(StringTransport())
    backend.dataReceived(link.transport.value())
    replies = backend.transport.value()
    assert replies == b"+OK\r\n" * 4
    flushes: list = []

    class TurnEnd:  # a reactor with turn-end calls, as kvha's
        call_at_turn_end = flushes.append

    a.flusher = b.flusher = TurnFlusher(TurnEnd())  # type: ignore[arg-type]
    link.dataReceived(replies[:7])  # one reply and a piece of the next
    link.dataReceived(replies[7:])
    assert a.transport.value() == b.transport.value() == b""  # replies wait for the turn's end
    assert len(flushes) == 1
    flushes.pop()()
    assert a.transport.value() == b"+OK\r\n" * 3
    assert b.transport.value() == b"+OK\r\n"
    assert not link.waiting


def test_kvha_bench_runs_what_make_bench_runs(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`kvha bench` runs bench/run.py, storage.py and hotpath.py for replicas 0 and 1 under
    this interpreter, passing its options on; hotpath gets a fixed hash seed."""
    import subprocess
    import sys

    from kvha import cli

    assert cli.main(["bench", "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    assert [line.split()[2].rsplit("/", 1)[1] for line in lines] == [
        "run.py",
        "storage.py",
        "hotpath.py",
        "hotpath.py",
    ]
    assert all(line.split()[1] == sys.executable for line in lines)
    assert lines[2].endswith(
        "--replicas 0 --out "
        + os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "bench",
            "results",
            "hotpath-r0.json",
        )
    )
    ran: list[tuple[list[str], dict[str, str]]] = []

    class Done:
        returncode = 0

    def fake_run(step: list[str], env: dict[str, str], cwd: str) -> Done:
        ran.append((step, env))
        return Done()

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert cli.main(["bench", "--quick", "--sections", "protocols", "--repeats", "1"]) == 0
    assert ran[0][0][2:] == ["--sections", "protocols", "--quick", "--repeats", "1"]
    assert len(ran) == 1  # --quick: run.py alone
    assert ran[0][1].get("PYTHONHASHSEED") == os.environ.get("PYTHONHASHSEED")
    ran.clear()
    assert cli.main(["bench", "--requests", "5000", "--big"]) == 0
    assert ran[0][0][2:] == ["--requests", "5000"]
    assert ran[1][0][2:] == ["--big"]
    assert all(env["PYTHONHASHSEED"] == "0" for _step, env in ran[2:])


def test_kvha_bench_outside_the_source_tree_says_why(capsys, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvha import cli, procs

    monkeypatch.setattr(procs, "SOURCE_ROOT", str(tmp_path))
    assert cli.main(["bench"]) == 1
    assert "needs kvha's source tree" in capsys.readouterr().err
