"""A plain, non-editable install carries the twistd plugin."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvha.procs import SOURCE_ROOT


@pytest.mark.process
def test_plain_install_lists_the_twistd_plugin(tmp_path):  # type: ignore[no-untyped-def]
    """After `pip install .` (not editable), `twistd --help` lists kvha-data."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            SOURCE_ROOT,
        ],
        check=True,
        capture_output=True,
    )
    assert not (target / "twisted" / "plugins" / "__init__.py").exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert "kvha-data" in out.stdout, out.stdout + out.stderr
