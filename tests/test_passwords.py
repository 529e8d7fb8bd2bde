"""Partition passwords: salted scrypt hashes, checked in constant time."""

from __future__ import annotations

import hmac

import pytest

from kvha import passwords
from kvha.passwords import hash_password, parse_password_hash, verify_password

CHEAP = {"n": 16, "r": 1, "p": 1}  # tests only: the cost travels with each hash


def test_hash_then_verify() -> None:
    """A hash verifies its password and no other."""
    encoded = hash_password("sessions-secret", **CHEAP)
    assert verify_password(b"sessions-secret", encoded)
    assert not verify_password(b"sessions-secreT", encoded)
    assert not verify_password(b"", encoded)


def test_salt_is_random_and_password_not_stored() -> None:
    """Two hashes of one password differ (random salt) and neither contains it."""
    a = hash_password("sessions-secret", **CHEAP)
    b = hash_password("sessions-secret", **CHEAP)
    assert a != b
    assert "sessions-secret" not in a
    assert a.startswith("scrypt$16$1$1$")


def test_default_cost_is_the_documented_one() -> None:
    """Without arguments the cost is scrypt N=2**14, r=8, p=1."""
    parsed = parse_password_hash(hash_password("x" * 8))
    assert parsed is not None and (parsed.n, parsed.r, parsed.p) == (1 << 14, 8, 1)


def test_injected_randomness_makes_hashes_reproducible() -> None:
    """The salt comes from the injected urandom."""
    fixed = lambda n: b"\x01" * n  # noqa: E731
    assert hash_password("pw-123456", urandom=fixed, **CHEAP) == hash_password(
        "pw-123456", urandom=fixed, **CHEAP
    )


def test_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The derived key is compared with hmac.compare_digest, never with ==."""
    calls = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(passwords.hmac, "compare_digest", spy)
    encoded = hash_password("pw-123456", **CHEAP)
    assert verify_password(b"pw-123456", encoded)
    assert not verify_password(b"pw-1234567", encoded)
    assert len(calls) == 2


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "plain",
        "sha256$abc",
        "scrypt$16$1$1$c2FsdHNhbHQ",  # too few fields
        "scrypt$15$1$1$c2FsdHNhbHQ$" + "A" * 43,  # N not a power of two
        "scrypt$2097152$8$1$c2FsdHNhbHQ$" + "A" * 43,  # N above the bound
        "scrypt$16$99$1$c2FsdHNhbHQ$" + "A" * 43,  # r above the bound
        "scrypt$16$1$1$!!!!$" + "A" * 43,  # salt not base64
        "scrypt$16$1$1$c2FsdHNhbHQ$AAAA",  # key of the wrong length
        "scrypt$x$1$1$c2FsdHNhbHQ$" + "A" * 43,
    ],
)
def test_malformed_hashes_are_refused(encoded: str) -> None:
    """Anything but a well-formed hash within the cost bounds parses to None and never verifies."""
    assert parse_password_hash(encoded) is None
    assert not verify_password(b"anything", encoded)


def test_bad_cost_is_refused_when_hashing() -> None:
    """hash_password refuses costs that parse_password_hash would refuse."""
    with pytest.raises(ValueError):
        hash_password("pw-123456", n=15)


def test_without_hashlib_scrypt_the_cryptography_one_gives_the_same_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PyPy 3.9's hashlib has no scrypt: cryptography's derives the same key from the same hash."""
    encoded = hash_password("pw-123456", **CHEAP)
    monkeypatch.setattr(passwords, "_hashlib_scrypt", None)
    assert verify_password(b"pw-123456", encoded)
    assert not verify_password(b"pw-1234567", encoded)
    assert verify_password(b"other-pw", hash_password("other-pw", **CHEAP))
