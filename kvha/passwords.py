"""Partition passwords: stored as salted scrypt hashes, checked in constant time.

A hash is one ASCII string, ``scrypt$N$r$p$<salt>$<key>`` (salt and key in
unpadded base64), so the cost travels with it and can be raised later
without invalidating older hashes.  The default cost (N=2**14, r=8, p=1)
takes some 50-100 ms and 16 MiB: masters therefore verify a password once,
off the reactor thread, and remember the outcome (see
:mod:`kvha.master.auth`), so a connection pays it at most once and a
client that reconnects with the same password does not pay it again.
Where ``hashlib`` has no scrypt (PyPy 3.9), ``cryptography``'s computes the
same function, so hashes made on one interpreter verify on the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Callable, NamedTuple, Optional, Union

#: scrypt cost: CPU/memory N, block size r, parallelism p.
DEFAULT_N = 1 << 14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
#: Bounds on costs accepted from a hash, so that a bad map cannot exhaust a master.
MAX_N = 1 << 20
MAX_R = 32
MAX_P = 16


class PasswordHash(NamedTuple):
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


#: hashlib's scrypt (CPython with OpenSSL); PyPy 3.9's hashlib has none.
_hashlib_scrypt: Optional[Callable[..., bytes]] = getattr(hashlib, "scrypt", None)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    if _hashlib_scrypt is not None:
        return _hashlib_scrypt(
            password, salt=salt, n=n, r=r, p=p, maxmem=256 * r * n * p + (1 << 20), dklen=KEY_BYTES
        )
    # The same function from `cryptography` (a dependency, through twisted[tls]).
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p).derive(password)


def hash_password(
    password: Union[str, bytes],
    *,
    n: int = DEFAULT_N,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
    urandom: Callable[[int], bytes] = os.urandom,
) -> str:
    """A new salted hash of ``password``, as stored in the cluster map."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    if not (2 <= n <= MAX_N and n & (n - 1) == 0 and 1 <= r <= MAX_R and 1 <= p <= MAX_P):
        raise ValueError(f"bad scrypt cost N={n} r={r} p={p}")
    salt = urandom(SALT_BYTES)
    key = _scrypt(password, salt, n, r, p)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def parse_password_hash(encoded: str) -> Optional[PasswordHash]:
    """The parts of a stored hash, or None if it is not one this module wrote."""
    parts = encoded.split("$") if isinstance(encoded, str) else []
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        return None
    if not (2 <= n <= MAX_N and n & (n - 1) == 0 and 1 <= r <= MAX_R and 1 <= p <= MAX_P):
        return None
    if len(salt) < 8 or len(key) != KEY_BYTES:
        return None
    return PasswordHash(n, r, p, salt, key)


def verify_password(password: bytes, encoded: str) -> bool:
    """Whether ``password`` matches the stored hash; the comparison takes constant time."""
    parsed = parse_password_hash(encoded)
    if parsed is None:
        return False
    key = _scrypt(password, parsed.salt, parsed.n, parsed.r, parsed.p)
    return hmac.compare_digest(key, parsed.key)
