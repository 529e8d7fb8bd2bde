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
