"""Shared fixtures: config text builders and real twistd node processes."""

from __future__ import annotations

import os
import textwrap

import pytest

from kvha.procs import NodeProcess, free_port

SECRET = "test-cluster-secret-0123456789"


def data_config(node_id: str, port: int, state_dir: str, **storage: object) -> str:
    lines = [f"    {k}: {v}" for k, v in storage.items()]
    storage_block = ("  storage:\n" + "\n".join(lines)) if lines else ""
    return textwrap.dedent(
        f"""\
        data:
          id: {node_id}
          listen: "tcp:{port}:interface=127.0.0.1"
          state_dir: "{state_dir}"
          secret: "{SECRET}"
        """
    ) + storage_block + "\n"


class NodeFactory:
    """Starts data nodes as real twistd processes and kills them all at the end."""

    def __init__(self, tmp_path: str) -> None:
        self.tmp_path = tmp_path
        self.nodes: list[NodeProcess] = []

    def data(self, node_id: str, **storage: object) -> NodeProcess:
        port = free_port()
        state_dir = os.path.join(self.tmp_path, node_id)
        os.makedirs(state_dir, exist_ok=True)
        path = os.path.join(self.tmp_path, f"{node_id}.yaml")
        with open(path, "w") as f:
            f.write(data_config(node_id, port, state_dir, **storage))
        node = NodeProcess("data", path, os.path.join(self.tmp_path, f"{node_id}.log"), port=port)
        self.nodes.append(node)
        return node

    def cleanup(self) -> None:
        for node in self.nodes:
            node.kill()
            node.stop()


@pytest.fixture
def nodes(tmp_path):  # type: ignore[no-untyped-def]
    factory = NodeFactory(str(tmp_path))
    yield factory
    factory.cleanup()
