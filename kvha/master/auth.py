"""Which partition a client connection (or an HTTP request) may use.

Decided once per connection, when it authenticates (Redis ``AUTH`` /
``HELLO ... AUTH``, memcached's ASCII ``set`` authentication), or once per
HTTP request (its bearer token): afterwards a connection just carries its
partition's name and commands pay nothing for it.

Checking a password against its scrypt hash is deliberately slow, so it runs
through ``verify`` (a thread pool in a real master, so the reactor keeps
serving everyone else) and a success is remembered on the partition's policy
as an HMAC of the password under a key made when the master starts: a client
that reconnects with the same password is let in at the cost of one HMAC.
Wrong passwords are never remembered and always pay the full check.  The
memory of successes goes with the policy object, so a changed password or a
changed map forgets it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any, Callable, Optional, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from kvha.master.router import PartitionPolicy, Router
from kvha.passwords import verify_password

log = Logger()

Verify = Callable[[bytes, str], Deferred]
#: What a connection's partition is before it has one (no partition name is empty).
NO_PARTITION = b""
#: Passwords remembered per partition before the memory is cleared.
MAX_REMEMBERED = 16


def verify_now(password: bytes, encoded: str) -> Deferred:
    """Check on the calling thread (tests, tools); a master uses a thread pool."""
    return defer.succeed(verify_password(password, encoded))


def thread_verifier(reactor: Any) -> Verify:
    """Check in the reactor's thread pool: scrypt releases the GIL while it works."""
    from twisted.internet.threads import deferToThreadPool

    def verify(password: bytes, encoded: str) -> Deferred:
        return deferToThreadPool(
            reactor, reactor.getThreadPool(), verify_password, password, encoded
        )

    return verify


class Authenticator:
    """Decides access to partitions by the router's current policies."""

    def __init__(
        self,
        router: Router,
        verify: Optional[Verify] = None,
        urandom: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.router = router
        self._verify = verify if verify is not None else verify_now
        self._key = urandom(32)
        self.successes = 0
        self.failures = 0

    def anonymous(self, partition: bytes) -> bool:
        """Whether a connection with no credentials may use ``partition``."""
        policy = self.router.policies.get(partition)
        return policy is not None and policy.anonymous

    def check(self, partition: bytes, password: bytes) -> Union[bool, Deferred]:
        """Whether ``password`` opens ``partition``: a bool now, or a Deferred firing with one.

        A partition without a password opens with any password if it allows
        anonymous access (as Redis's ``nopass`` user), else with none.
        """
        policy = self.router.policies.get(partition)
        if policy is None:
            self.failures += 1
            return False
        if policy.password_hash is None:
            if policy.anonymous:
                return True
            self.failures += 1
            return False
        tag = hmac.new(self._key, partition + b"\x00" + password, hashlib.sha256).digest()
        if tag in policy.verified:
            self.successes += 1
            return True
        d = self._verify(password, policy.password_hash)
        d.addCallback(self._verified, policy, tag)
        return d

    def _verified(self, ok: bool, policy: PartitionPolicy, tag: bytes) -> bool:
        if ok:
            self.successes += 1
            if len(policy.verified) >= MAX_REMEMBERED:
                policy.verified.clear()
            policy.verified.add(tag)
        else:
            self.failures += 1
        return bool(ok)


def when_checked(answer: Union[bool, Deferred], then: Callable[[bool], Any]) -> Any:
    """Call ``then`` with the outcome now if it is known, else when it is."""
    if isinstance(answer, Deferred):
        return answer.addCallback(then)
    return then(answer)
