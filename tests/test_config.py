"""Tests for kvha.config and ``kvha config check``.

Every kind of mistake must name its key path: an operator reading the error
should be able to go straight to the offending line of the file.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvha import cli
from kvha.config import (
    ENGINES,
    Config,
    ConfigError,
    DataConfig,
    _build,
    format_path,
    load_config,
    load_config_string,
)

ROOT = Path(__file__).resolve().parent.parent
SECRET = "0123456789abcdef"
BASE = f"""\
data:
  id: node1
  listen: "tcp:7101:interface=127.0.0.1"
  state_dir: ./var/node1
  secret: "{SECRET}"
"""


def data_config(extra: str = "", base: str = BASE) -> DataConfig:
    """Load BASE plus ``extra`` (YAML written relative to the data: section)."""
    config = load_config_string(base + textwrap.indent(textwrap.dedent(extra), "  "))
    assert config.role == "data" and config.data is not None
    return config.data


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config_string(text)
    return info.value


def data_error(extra: str, base: str = BASE) -> str:
    with pytest.raises(ConfigError) as info:
        data_config(extra, base)
    return str(info.value)


def without(key: str) -> str:
    lines = [line for line in BASE.splitlines(True) if not line.startswith(f"  {key}:")]
    assert len(lines) == len(BASE.splitlines()) - 1
    return "".join(lines)


# --- defaults, units, immutability -------------------------------------------


def test_minimal_config_fills_defaults() -> None:
    config = load_config_string(BASE, source="node1.yaml")
    assert config.role == "data" and config.source == "node1.yaml"
    d = config.data
    assert d is not None
    assert (d.id, d.listen, d.state_dir, d.secret) == (
        "node1",
        "tcp:7101:interface=127.0.0.1",
        "./var/node1",
        SECRET,
    )
    assert d.tombstone_ttl == 7 * 86400.0
    assert d.expiry_sweep_interval == 0.1
    assert d.expiry_sweep_batch == 2000
    s = d.storage
    assert (s.engine, s.fsync, s.snapshot_interval) == ("memory", "everysec", 300.0)
    assert (s.snapshot_log_bytes, s.segment_bytes) == (64 << 20, 16 << 20)
    lim = d.limits
    assert (lim.max_frame_bytes, lim.max_value_bytes) == (32 << 20, 1 << 20)
    assert (lim.max_connections, lim.max_in_flight, lim.request_timeout) == (1024, 1024, 5.0)
    st = d.stream
    assert (st.batch_records, st.window_batches, st.max_bytes_per_second) == (512, 8, 0)
    assert d == DataConfig(id="node1", listen=d.listen, state_dir=d.state_dir, secret=SECRET)


def test_null_and_empty_sections_mean_defaults() -> None:
    d = data_config("storage:\nlimits: {}\n")
    assert d.storage.engine == "memory" and d.limits.max_connections == 1024


def test_durable_engine_knobs() -> None:
    d = data_config(
        "storage:\n  engine: mmap-index\n  map_size: 4GiB\n  compaction_garbage_ratio: 0.25\n"
        "  compaction_min_bytes: 1MiB\n"
    )
    s = d.storage
    assert (s.engine, s.map_size, s.compaction_garbage_ratio, s.compaction_min_bytes) == (
        "mmap-index",
        4 << 30,
        0.25,
        1 << 20,
    )
    defaults = data_config("").storage
    assert (defaults.map_size, defaults.compaction_garbage_ratio) == (1 << 30, 0.5)
    assert defaults.compaction_min_bytes == 64 << 20


def test_partial_section_keeps_other_defaults() -> None:
    d = data_config("storage:\n  engine: log\n  fsync: always\n")
    assert (d.storage.engine, d.storage.fsync, d.storage.segment_bytes) == (
        "log",
        "always",
        16 << 20,
    )
    assert "log" in ENGINES


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("'10'", 10.0),
        ("30", 30.0),
        ("2.5", 2.5),
        ("' 3 s '", 3.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    d = data_config(f"tombstone_ttl: {text}\n")
    assert d.tombstone_ttl == pytest.approx(seconds)
    assert isinstance(d.tombstone_ttl, float)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("'4096'", 4096),
        ("512KiB", 512 * 1024),
        ("64MiB", 64 << 20),
        ("1GiB", 1 << 30),
        ("10kB", 10_000),
        ("1MB", 1_000_000),
        ("1GB", 1_000_000_000),
        ("8 KiB", 8192),
        ("0.5MiB", 512 * 1024),
    ],
)
def test_sizes(text: str, size: int) -> None:
    d = data_config(f"storage:\n  segment_bytes: {text}\n")
    assert d.storage.segment_bytes == size
    assert isinstance(d.storage.segment_bytes, int)


def test_size_zero_means_unthrottled() -> None:
    assert data_config("stream:\n  max_bytes_per_second: 0\n").stream.max_bytes_per_second == 0
    assert data_config("stream: {max_bytes_per_second: 50MiB}").stream.max_bytes_per_second == (
        50 << 20
    )


def test_objects_are_frozen() -> None:
    config = load_config_string(BASE)
    assert config.data is not None
    for obj, name in [
        (config, "role"),
        (config.data, "id"),
        (config.data.storage, "fsync"),
        (config.data.limits, "max_value_bytes"),
        (config.data.stream, "batch_records"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, getattr(obj, name))


def test_secret_is_not_in_repr() -> None:
    assert SECRET not in repr(load_config_string(BASE))


# --- errors ------------------------------------------------------------------

ALL_DATA_KEYS = (
    "expiry_sweep_batch, expiry_sweep_interval, id, limits, listen, merge_on_start, secret, "
    "secret_file, state_dir, storage, stream, tombstone_ttl"
)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # unknown keys
        ("colour: blue", f"data: unknown key 'colour'; expected one of {ALL_DATA_KEYS}"),
        (
            "storage:\n  fsnyc: always",
            "data.storage: unknown key 'fsnyc'; expected one of compaction_garbage_ratio, "
            "compaction_min_bytes, engine, fsync, map_size, segment_bytes, snapshot_interval, "
            "snapshot_log_bytes",
        ),
        (
            "stream: {window: 2}",
            "data.stream: unknown key 'window'; expected one of batch_records, "
            "max_bytes_per_second, window_batches",
        ),
        # wrong types
        (
            "limits:\n  max_connections: abc",
            "data.limits.max_connections: expected an integer; got 'abc'",
        ),
        (
            "limits:\n  max_connections: true",
            "data.limits.max_connections: expected an integer; got True",
        ),
        (
            "limits:\n  max_in_flight: 1.5",
            "data.limits.max_in_flight: expected an integer; got 1.5",
        ),
        ("stream: [1, 2]", "data.stream: expected a mapping; got [1, 2]"),
        ("storage: log", "data.storage: expected a mapping; got 'log'"),
        # enums
        (
            "storage:\n  fsync: sometimes",
            "data.storage.fsync: expected one of always, everysec, os; got 'sometimes'",
        ),
        (
            "storage:\n  engine: bitcask",
            "data.storage.engine: expected one of memory, log, disk, mmap, mmap-index; "
            "got 'bitcask'",
        ),
        (
            "storage:\n  engine: 1",
            "data.storage.engine: expected one of memory, log, disk, mmap, mmap-index; got 1",
        ),
        (
            "storage:\n  compaction_garbage_ratio: 0",
            "data.storage.compaction_garbage_ratio: must be greater than 0; got 0",
        ),
        (
            "storage:\n  compaction_garbage_ratio: 1.5",
            "data.storage.compaction_garbage_ratio: must be at most 1; got 1.5",
        ),
        (
            "storage:\n  map_size: 4KiB",
            "data.storage.map_size: must be at least 1048576; got '4KiB' (4096)",
        ),
        # durations
        (
            "tombstone_ttl: 7 days",
            "data.tombstone_ttl: expected a duration such as 30, 250ms, 1.5s, 5m, 2h or 7d; "
            "got '7 days'",
        ),
        (
            "expiry_sweep_interval: true",
            "data.expiry_sweep_interval: expected a duration such as 30, 250ms, 1.5s, 5m, 2h "
            "or 7d; got True",
        ),
        ("tombstone_ttl: 0", "data.tombstone_ttl: must be greater than 0; got 0"),
        ("tombstone_ttl: 0s", "data.tombstone_ttl: must be greater than 0; got '0s' (0.0)"),
        ("tombstone_ttl: -1", "data.tombstone_ttl: must be greater than 0; got -1"),
        ("tombstone_ttl: .inf", "data.tombstone_ttl: expected a finite number; got inf"),
        (f"tombstone_ttl: '{'9' * 400}d'", "data.tombstone_ttl: expected a finite number; got inf"),
        (
            "limits: {request_timeout: 0ms}",
            "data.limits.request_timeout: must be greater than 0; got '0ms' (0.0)",
        ),
        # sizes
        *[
            (
                f"storage:\n  segment_bytes: {bad}",
                "data.storage.segment_bytes: expected a size in bytes such as 4096, 512KiB, "
                f"64MiB or 1GB; got {shown}",
            )
            for bad, shown in [
                ("64 megabytes", "'64 megabytes'"),
                ("64K", "'64K'"),
                ("-1", "-1"),
                ("1.5", "1.5"),
                ("'1.5'", "'1.5'"),
                ("false", "False"),
            ]
        ],
        (
            "storage:\n  segment_bytes: 100",
            "data.storage.segment_bytes: must be at least 4096; got 100",
        ),
        (
            "storage:\n  snapshot_log_bytes: 1KiB",
            "data.storage.snapshot_log_bytes: must be at least 4096; got '1KiB' (1024)",
        ),
        (
            "limits:\n  max_frame_bytes: 32KiB",
            "data.limits.max_frame_bytes: must be at least 65536; got '32KiB' (32768)",
        ),
        ("limits:\n  max_value_bytes: 0", "data.limits.max_value_bytes: must be at least 1; got 0"),
        # out-of-range ints
        ("expiry_sweep_batch: 0", "data.expiry_sweep_batch: must be at least 1; got 0"),
        ("stream:\n  window_batches: -3", "data.stream.window_batches: must be at least 1; got -3"),
        # cross-field limit
        (
            "limits:\n  max_frame_bytes: 1MiB\n  max_value_bytes: 1MiB",
            "data.limits.max_value_bytes: must be less than max_frame_bytes - 64KiB (983040); "
            "got 1048576",
        ),
    ],
)
def test_data_errors(extra: str, message: str) -> None:
    assert data_error(extra) == message


def test_huge_duration() -> None:
    message = data_error(f"tombstone_ttl: {10**400}")
    assert message.startswith("data.tombstone_ttl: expected a finite number; got 1000")
    assert message.endswith("...")


def test_error_attributes() -> None:
    with pytest.raises(ConfigError) as info:
        data_config("storage:\n  fsync: sometimes\n")
    err = info.value
    assert err.path == ("data", "storage", "fsync")
    assert err.message == "expected one of always, everysec, os; got 'sometimes'"
    assert str(ConfigError((), "plain")) == "plain"
    assert str(ConfigError(("master", "nodes", "[2]", "id"), "x")) == "master.nodes[2].id: x"
    assert format_path(("a", "[0]", "[1]", "b")) == "a[0][1].b"


def test_long_values_are_shortened() -> None:
    message = data_error("stream: [" + ", ".join(["12345"] * 100) + "]")
    assert message.startswith("data.stream: expected a mapping; got [12345, ")
    assert message.endswith("...") and len(message) < 140


def test_max_value_below_frame_limit_is_accepted() -> None:
    d = data_config("limits:\n  max_frame_bytes: 1MiB\n  max_value_bytes: 512KiB\n")
    assert (d.limits.max_frame_bytes, d.limits.max_value_bytes) == (1 << 20, 512 << 10)


@pytest.mark.parametrize("key", ["id", "listen", "state_dir"])
def test_missing_required_key(key: str) -> None:
    assert data_error("", base=without(key)) == f"data.{key}: required key is missing"


def test_null_role_section_reports_required_keys() -> None:
    assert str(config_error("data:\n")) == "data.id: required key is missing"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("bad id", "'bad id'"),
        ("-leading-dash", "'-leading-dash'"),
        ("a" * 65, repr("a" * 65)),
        ('"node1\\n"', "'node1\\n'"),
        ("''", "''"),
        ("7", None),
    ],
)
def test_bad_id(value: str, shown: str) -> None:
    base = BASE.replace("id: node1", f"id: {value}")
    expected = (
        "data.id: expected a string; got 7"
        if shown is None
        else f"data.id: expected an id matching ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$; got {shown}"
    )
    assert data_error("", base=base) == expected


@pytest.mark.parametrize("value", ["a", "node-1.eu_west", "A" * 64, "9x"])
def test_good_ids(value: str) -> None:
    assert data_config("", base=BASE.replace("id: node1", f"id: {value}")).id == value


@pytest.mark.parametrize("value", ["'7101'", "'tcp:'", "'http://127.0.0.1:7101'", "'ssl'"])
def test_bad_endpoint(value: str) -> None:
    base = BASE.replace('listen: "tcp:7101:interface=127.0.0.1"', f"listen: {value}")
    message = data_error("", base=base)
    assert message.startswith(
        "data.listen: expected a Twisted endpoint string starting with tcp:, tcp6:, unix:, ssl:;"
    )
    assert message.endswith(f"got {value}")


@pytest.mark.parametrize(
    "value", ["tcp6:7101:interface=\\:\\:1", "unix:/tmp/kvha.sock", "ssl:7101:privateKey=k.pem"]
)
def test_good_endpoints(value: str) -> None:
    base = BASE.replace('"tcp:7101:interface=127.0.0.1"', f"'{value}'")
    assert data_config("", base=base).listen == value


# --- the secret --------------------------------------------------------------


def test_secret_neither_given() -> None:
    assert data_error("", base=without("secret")) == (
        "data.secret: exactly one of secret or secret_file must be given"
    )


def test_secret_both_given(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    with pytest.raises(ConfigError) as info:
        data_config(f"secret_file: {secret_file}\n")
    assert info.value.path == ("data", "secret")
    assert info.value.message == "exactly one of secret or secret_file must be given"


def test_secret_too_short_is_not_echoed() -> None:
    base = BASE.replace(SECRET, "short-secret")
    assert data_error("", base=base) == "data.secret: must be at least 16 characters; got 12"
    assert "short-secret" not in data_error("", base=base)


def test_secret_wrong_type_is_not_echoed() -> None:
    base = BASE.replace(f'"{SECRET}"', "12345678901234567890")
    assert data_error("", base=base) == "data.secret: expected a string; got int"


def test_secret_file_is_read_and_stripped(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(f"  {SECRET}xyz\n")
    d = data_config(f"secret_file: '{secret_file}'\n", base=without("secret"))
    assert d.secret == SECRET + "xyz"


def test_secret_file_too_short(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("tiny\n")
    message = data_error(f"secret_file: '{secret_file}'\n", base=without("secret"))
    assert message == "data.secret_file: must be at least 16 characters; got 4"


def test_secret_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    message = data_error(f"secret_file: '{missing}'\n", base=without("secret"))
    assert message.startswith(f"data.secret_file: cannot read secret file '{missing}': ")


# --- whole-document errors ---------------------------------------------------


def test_unknown_top_level_key() -> None:
    err = config_error(BASE + "datta: {}\n")
    assert err.path == ()
    assert str(err) == "unknown key 'datta'; expected one of data, lb, local, master"


def test_empty_mapping_document() -> None:
    assert (
        str(config_error("{}"))
        == "expected exactly one role key, one of data, master, lb, local; got none"
    )


@pytest.mark.parametrize(
    ("text", "shown"), [("- a\n- b\n", "['a', 'b']"), ("hello\n", "'hello'"), ("42", "42")]
)
def test_non_mapping_document(text: str, shown: str) -> None:
    err = config_error(text)
    assert err.path == () and str(err) == f"expected a mapping; got {shown}"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_document(text: str) -> None:
    err = config_error(text)
    assert err.path == ()
    assert (
        str(err) == "empty document; expected a mapping with one role key (data, master, lb, local)"
    )


def test_yaml_syntax_error_names_source_and_line() -> None:
    text = "data:\n  id: node1\n  listen: [unclosed\n  state_dir: x: y\n"
    with pytest.raises(ConfigError) as info:
        load_config_string(text, source="etc/broken.yaml")
    err = info.value
    assert err.path == ()
    assert err.message.startswith("invalid YAML in etc/broken.yaml at line ")
    assert str(err) == err.message


def test_yaml_error_line_number() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_string("data:\n  id: a\n  listen: b: c\n", source="x.yaml")
    assert str(info.value) == (
        "invalid YAML in x.yaml at line 3, column 12: mapping values are not allowed here"
    )


def test_load_config_reads_files(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(BASE)
    config = load_config(str(path))
    assert isinstance(config, Config) and config.source == str(path)


@pytest.mark.parametrize("content", [None, b"\xff\xfe\x00data"])
def test_load_config_unreadable_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.path == ()
    assert info.value.message.startswith(f"cannot read config file '{path}': ")


# --- the generic walker, for the roles still to come ---------------------------


@dataclass(frozen=True)
class _Node:
    id: str = dataclasses.field(metadata={"kind": "id"})
    weight: float = 1.0
    enabled: bool = True


@dataclass(frozen=True)
class _Cluster:
    nodes: tuple[_Node, ...]
    ports: list[int] = dataclasses.field(default_factory=list, metadata={"min": 1})


def test_walker_lists_and_bools() -> None:
    raw = {"nodes": [{"id": "a"}, {"id": "b", "weight": 2, "enabled": False}], "ports": [1, 2]}
    cluster = _build(_Cluster, raw, ("master",))
    assert cluster.nodes == (_Node("a"), _Node("b", 2.0, False))
    assert cluster.ports == [1, 2] and isinstance(cluster.nodes[1].weight, float)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"nodes": [{"id": "a"}, {"id": "b"}, {"id": "bad id"}]},
            "master.nodes[2].id: expected an id matching",
        ),
        ({"nodes": [{"id": "a", "enabled": "yes"}]}, "master.nodes[0].enabled: expected true or"),
        (
            {"nodes": [{"id": "a", "weight": "x"}]},
            "master.nodes[0].weight: expected a number; got 'x'",
        ),
        ({"nodes": {"id": "a"}}, "master.nodes: expected a list; got {'id': 'a'}"),
        ({"nodes": [], "ports": [0]}, "master.ports[0]: must be at least 1; got 0"),
    ],
)
def test_walker_errors(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _build(_Cluster, raw, ("master",))
    assert str(info.value).startswith(message)


# --- kvha config check ---------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_cli_check_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "good.yaml", BASE)
    assert cli.main(["config", "check", path]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok (role data)\n" and err == ""


def test_cli_check_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "bad.yaml", BASE + "  storage:\n    fsync: sometimes\n")
    assert cli.main(["config", "check", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"{path}: data.storage.fsync: expected one of always, everysec, os; got 'sometimes'\n"
    )


def test_cli_check_several_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "good.yaml", BASE)
    bad = write(tmp_path, "bad.yaml", "")
    assert cli.main(["config", "check", good, bad]) == 1
    out, err = capsys.readouterr()
    assert out == f"{good}: ok (role data)\n"
    assert err.startswith(f"{bad}: empty document")


def test_cli_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "missing.yaml")
    assert cli.main(["config", "check", path]) == 1
    assert capsys.readouterr().err.startswith(f"{path}: cannot read config file")


@pytest.mark.parametrize("argv", [[], ["config"], ["config", "check"], ["nonsense"]])
def test_cli_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "usage: kvha" in capsys.readouterr().err


def test_cli_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "config" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("kvha ")


def test_python_dash_m(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", BASE.replace("node1", "bad id", 1))
    proc = subprocess.run(
        [sys.executable, "-m", "kvha", "config", "check", path],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{path}: data.id: expected an id matching")


# --- shipped examples ------------------------------------------------------------

EXAMPLES = sorted((ROOT / "etc").glob("*.yaml"))


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"data-memory.yaml", "data-log.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    config = load_config(str(path))
    assert config.source == str(path)
    assert getattr(config, config.role) is not None


def test_example_engines() -> None:
    engines = {
        load_config(str(ROOT / "etc" / f"data-{e}.yaml")).data.storage.engine for e in ENGINES
    }
    assert engines == set(ENGINES)


def test_local_admin_token_too_short_names_its_key() -> None:
    """kvha up's file refuses an admin token the derived node configs would refuse."""
    text = 'local:\n  secret: "0123456789abcdef0123"\n  admin_token: "short"\n'
    with pytest.raises(ConfigError) as info:
        load_config_string(text)
    assert str(info.value) == "local.admin_token: must be at least 16 characters; got 5"
