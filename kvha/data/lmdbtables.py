"""Partitioned tables in one LMDB environment: what ``mmap`` and ``mmap-index`` share.

LMDB keeps a copy-on-write B+tree in one memory-mapped file.  A committed
transaction is complete and a crashed one is invisible, with no log and no
replay, so opening takes the same time whatever the size of the data.
Layout inside the environment (one directory, ``data.mdb`` and ``lock.mdb``):

* ``s:<partition>``: keys of 1 to 511 bytes (LMDB's limit) as they are;
* ``l:<partition>``: the other keys (empty, or longer), stored under their
  BLAKE2b-256 digest with the key itself in front of the value;
* ``meta``: the engine's bookkeeping (counts, high water, ...).

Writes go into one write transaction that :meth:`LmdbTables.commit` ends, so
one reactor turn is one transaction (group commit).  The fsync policy maps to
LMDB's flags: ``always`` syncs on every commit; ``everysec`` and ``os`` do
not (``MDB_NOSYNC | MDB_NOMETASYNC``) and the engine calls :meth:`sync` once
a second for ``everysec``.  When the map fills up, the transaction so far is
redone in a map twice the size, so a write never fails for lack of map.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Any, Callable, Optional

import lmdb
from twisted.logger import Logger

log = Logger()

META = b"meta"
_SHORT = b"s:"
_LONG = b"l:"
_KEYLEN = struct.Struct("<I")

#: Partitions an environment is sure to hold: each takes one named database,
#: two once it holds a key LMDB cannot take as it is.
MAX_PARTITIONS = 500

#: Grow the map once it is this full, between transactions.
GROW_AT = 0.75


class CorruptStore(Exception):
    """An LMDB environment that must not be used (truncated, or not LMDB at all)."""


def _digest(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=32).digest()


def quarantine(path: str, stamp: float) -> str:
    """Move a damaged store aside (never delete it); return where it went."""
    base = f"{path}.corrupt-{int(stamp)}"
    dest = base
    n = 0
    while os.path.exists(dest):
        n += 1
        dest = f"{base}-{n}"
    os.rename(path, dest)
    return dest


class LmdbTables:
    """``(partition, key) -> value`` tables plus a meta table, in one environment."""

    def __init__(self, path: str, fsync: str, map_size: int) -> None:
        self.path = path
        self.fsync = fsync
        self.map_size = map_size
        self.env: Any = None
        self._max_key = 511
        self._short: dict[bytes, Any] = {}  # partition -> handle of its s: database
        self._long: dict[bytes, Any] = {}  # partition -> handle of its l: database
        self._meta: Any = None
        self._wtxn: Any = None
        self._rtxn: Any = None
        self._ops: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.map_grown = 0

    # Opening ------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating if new); raise CorruptStore if the file cannot be trusted."""
        os.makedirs(self.path, exist_ok=True)
        data = os.path.join(self.path, "data.mdb")
        if os.path.exists(data) and os.path.getsize(data) < 2 * mmap.PAGESIZE:
            # LMDB would take an empty file for a new environment and say nothing.
            raise CorruptStore(f"{data} is too short to hold LMDB's meta pages")
        always = self.fsync == "always"
        try:
            env = lmdb.open(
                self.path,
                map_size=self.map_size,
                subdir=True,
                max_dbs=2 * MAX_PARTITIONS + 1,
                sync=always,
                metasync=always,
                readahead=False,  # random reads: do not fault in neighbouring pages
                meminit=False,
                max_spare_txns=1,
                lock=True,
            )
        except lmdb.Error as e:
            raise CorruptStore(f"{data}: LMDB cannot open it: {e}") from None
        try:
            info = env.info()
            psize = env.stat()["psize"]
            needed = (info["last_pgno"] + 1) * psize
            actual = os.path.getsize(data)
            if actual < needed:
                # Reading a page past the end of a mapped file is SIGBUS, not an error.
                raise CorruptStore(
                    f"{data} is truncated: its last transaction uses {needed} bytes "
                    f"and the file has {actual}"
                )
            self.env = env
            env.reader_check()  # free the reader slots of a killed process
            self._max_key = env.max_key_size()
            self.map_size = info["map_size"]
            txn = env.begin(write=True)
            self._load_handles(txn)
            txn.commit()
        except CorruptStore:
            env.close()
            self.env = None
            raise
        except lmdb.Error as e:
            env.close()
            self.env = None
            raise CorruptStore(f"{data}: {e}") from None

    def _load_handles(self, txn: Any) -> None:
        """(Re)open the handle of every database the environment holds."""
        self._short.clear()
        self._long.clear()
        names = list(txn.cursor().iternext(keys=True, values=False))
        for name in names:
            db = self.env.open_db(name, txn=txn, create=False)
            if name.startswith(_SHORT):
                self._short[name[len(_SHORT) :]] = db
            elif name.startswith(_LONG):
                self._long[name[len(_LONG) :]] = db
        self._meta = self.env.open_db(META, txn=txn, create=True)

    def close(self) -> None:
        if self.env is None:
            return
        if self._wtxn is not None:
            self.commit()
        self._drop_reader()
        self.env.close()
        self.env = None

    # Transactions ---------------------------------------------------------------

    def _txn(self) -> Any:
        """The transaction reads go through: the write one if open (it sees its own writes)."""
        return self._wtxn if self._wtxn is not None else self._reader()

    def _reader(self) -> Any:
        if self._rtxn is None:
            self._rtxn = self.env.begin()
        return self._rtxn

    def _drop_reader(self) -> None:
        if self._rtxn is not None:
            self._rtxn.abort()
            self._rtxn = None

    def _writer(self) -> Any:
        if self._wtxn is None:
            self._drop_reader()
            self._wtxn = self.env.begin(write=True)
        return self._wtxn

    def _run(self, op: Callable[..., Any], *args: Any) -> Any:
        txn = self._writer()
        while True:
            try:
                result = op(txn, *args)
                break
            except lmdb.MapFullError:
                txn = self._grow()
        self._ops.append((op, args))
        return result

    def _grow(self) -> Any:
        """Abort, double the map, redo the transaction so far; return the new transaction."""
        while True:
            if self._wtxn is not None:
                try:
                    self._wtxn.abort()
                except lmdb.Error:
                    pass  # a failed commit has already ended it
            self._wtxn = None
            self._drop_reader()
            self.map_size *= 2
            self.env.set_mapsize(self.map_size)
            self.map_grown += 1
            log.info(
                "LMDB map of {path} full: grown to {size} bytes, transaction redone",
                path=self.path,
                size=self.map_size,
            )
            txn = self._wtxn = self.env.begin(write=True)
            self._load_handles(txn)
            try:
                for op, args in self._ops:
                    op(txn, *args)
            except lmdb.MapFullError:
                continue
            return txn

    def commit(self) -> None:
        if self._wtxn is None:
            return
        while True:
            try:
                self._wtxn.commit()
                break
            except lmdb.MapFullError:
                self._grow()
        self._wtxn = None
        self._ops.clear()
        info = self.env.info()
        if (info["last_pgno"] + 1) * self.env.stat()["psize"] > GROW_AT * self.map_size:
            self.map_size *= 2
            self.env.set_mapsize(self.map_size)
            self.map_grown += 1
            log.info("LMDB map of {path} grown to {size} bytes", path=self.path, size=self.map_size)

    @property
    def pending(self) -> bool:
        """Whether a write transaction is open (something to commit)."""
        return self._wtxn is not None

    def sync(self) -> None:
        """Flush data and meta pages to disk, whatever the sync flags."""
        self.env.sync(True)

    # Records ------------------------------------------------------------------

    def get(self, partition: bytes, key: bytes) -> Optional[bytes]:
        txn = self._txn()
        if 0 < len(key) <= self._max_key:
            db = self._short.get(partition)
            return None if db is None else txn.get(key, db=db)
        db = self._long.get(partition)
        if db is None:
            return None
        raw = txn.get(_digest(key), db=db)
        return None if raw is None else _long_value(raw, key)

    def replace(self, partition: bytes, key: bytes, value: bytes) -> Optional[bytes]:
        """Store ``value``; return the previous value, if any."""
        return self._run(self._replace, partition, key, value)  # type: ignore[no-any-return]

    def _replace(self, txn: Any, partition: bytes, key: bytes, value: bytes) -> Optional[bytes]:
        if 0 < len(key) <= self._max_key:
            db = self._short.get(partition)
            if db is None:
                db = self._short[partition] = self._create(txn, _SHORT + partition)
            return txn.replace(key, value, db=db)  # type: ignore[no-any-return]
        db = self._long.get(partition)
        if db is None:
            db = self._long[partition] = self._create(txn, _LONG + partition)
        old = txn.replace(_digest(key), _KEYLEN.pack(len(key)) + key + value, db=db)
        return None if old is None else _long_value(old, key)

    def _create(self, txn: Any, name: bytes) -> Any:
        try:
            return self.env.open_db(name, txn=txn, create=True)
        except lmdb.DbsFullError:
            raise ValueError(
                f"{self.path}: too many partitions for one LMDB store (at least "
                f"{MAX_PARTITIONS} fit)"
            ) from None

    def pop(self, partition: bytes, key: bytes) -> Optional[bytes]:
        """Remove a key; return its value, if it had one."""
        if 0 < len(key) <= self._max_key:
            if partition not in self._short:
                return None
        elif partition not in self._long:
            return None
        return self._run(self._pop, partition, key)  # type: ignore[no-any-return]

    def _pop(self, txn: Any, partition: bytes, key: bytes) -> Optional[bytes]:
        if 0 < len(key) <= self._max_key:
            db = self._short.get(partition)
            return None if db is None else txn.pop(key, db=db)
        db = self._long.get(partition)
        if db is None:
            return None
        old = txn.pop(_digest(key), db=db)
        return None if old is None else _long_value(old, key)

    def drop(self, partition: bytes) -> None:
        """Delete a partition's databases."""
        if partition in self._short or partition in self._long:
            self._run(self._drop, partition)

    def _drop(self, txn: Any, partition: bytes) -> None:
        for handles in (self._short, self._long):
            db = handles.pop(partition, None)
            if db is not None:
                txn.drop(db, delete=True)

    def keys(self, partition: bytes) -> list[bytes]:
        """A snapshot of a partition's keys (uncommitted writes included)."""
        txn = self._txn()
        keys: list[bytes] = []
        db = self._short.get(partition)
        if db is not None:
            keys = list(txn.cursor(db=db).iternext(keys=True, values=False))
        db = self._long.get(partition)
        if db is not None:
            for raw in txn.cursor(db=db).iternext(keys=False, values=True):
                (n,) = _KEYLEN.unpack_from(raw)
                keys.append(bytes(raw[_KEYLEN.size : _KEYLEN.size + n]))
        return keys

    def iter_keys(self, partition: bytes, batch: int = 1000) -> Iterator[bytes]:
        """A partition's keys, ``batch`` at a time, in key order (then the long keys).

        Each batch is read afresh from where the last one ended, so nothing
        is held across commits; a key present throughout is yielded once.
        """
        for handles, long_keys in ((self._short, False), (self._long, True)):
            last: Optional[bytes] = None
            while True:
                db = handles.get(partition)
                if db is None:
                    break
                txn = self._txn()
                cursor = txn.cursor(db=db)
                if last is None:
                    more = cursor.first()
                else:
                    more = cursor.set_range(last)
                    if more and cursor.key() == last:
                        more = cursor.next()
                found: list[tuple[bytes, bytes]] = []
                while more and len(found) < batch:
                    found.append((cursor.key(), cursor.value() if long_keys else b""))
                    more = cursor.next()
                cursor.close()
                if not found:
                    break
                last = found[-1][0]
                for key, raw in found:
                    if long_keys:
                        (n,) = _KEYLEN.unpack_from(raw)
                        yield bytes(raw[_KEYLEN.size : _KEYLEN.size + n])
                    else:
                        yield key
                if not more:
                    break

    def items(self, partition: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Every ``(key, value)`` of a partition, from a snapshot taken now."""
        txn = self._txn()
        pairs: list[tuple[bytes, bytes]] = []
        db = self._short.get(partition)
        if db is not None:
            pairs = list(txn.cursor(db=db).iternext(keys=True, values=True))
        db = self._long.get(partition)
        if db is not None:
            for raw in txn.cursor(db=db).iternext(keys=False, values=True):
                (n,) = _KEYLEN.unpack_from(raw)
                pairs.append((bytes(raw[_KEYLEN.size : _KEYLEN.size + n]), raw[_KEYLEN.size + n :]))
        return iter(pairs)

    # Meta ---------------------------------------------------------------------

    def meta_items(self) -> list[tuple[bytes, bytes]]:
        txn = self._txn()
        return list(txn.cursor(db=self._meta).iternext(keys=True, values=True))

    def meta_put(self, key: bytes, value: bytes) -> None:
        self._run(self._meta_put, key, value)

    def _meta_put(self, txn: Any, key: bytes, value: bytes) -> None:
        txn.put(key, value, db=self._meta)

    def meta_delete(self, key: bytes) -> None:
        self._run(self._meta_delete, key)

    def _meta_delete(self, txn: Any, key: bytes) -> None:
        txn.delete(key, db=self._meta)

    # Figures ------------------------------------------------------------------

    def file_bytes(self) -> int:
        try:
            return os.path.getsize(os.path.join(self.path, "data.mdb"))
        except OSError:
            return 0

    def stats(self) -> dict[str, int]:
        info = self.env.info()
        return {
            "lmdb_map_size": int(info["map_size"]),
            "lmdb_used_bytes": int((info["last_pgno"] + 1) * self.env.stat()["psize"]),
            "lmdb_file_bytes": self.file_bytes(),
            "lmdb_map_grown": self.map_grown,
        }


def _long_value(raw: bytes, key: bytes) -> Optional[bytes]:
    (n,) = _KEYLEN.unpack_from(raw)
    if raw[_KEYLEN.size : _KEYLEN.size + n] != key:
        return None  # another key with the same digest: not this one
    return raw[_KEYLEN.size + n :]
