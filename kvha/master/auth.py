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

Failed attempts are counted per client address and partition: after
``max_failures`` within ``window`` seconds, every attempt from that address
on that partition is refused at once (:class:`TooManyFailures`, without a
check, right password or not) until the oldest of those failures is
``window`` old.  Checks still running count against that budget, so
guesses sent at once on many connections get no more checks.  That bounds
both password guessing and the CPU an address can make the master spend on
scrypt.  Counting per partition keeps a client with a wrong password from
locking everyone else behind the same address (a load balancer in ``proxy``
mode, a NAT) out of their own partitions; names of partitions that do not
exist count as one, so they cannot crowd out the table.  A success does not
clear the count: behind a shared address it would reset a guesser's too.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from collections import OrderedDict, deque
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
#: (address, partition) pairs whose failures are tracked; the least recently failing go first.
MAX_TRACKED = 10_000


class TooManyFailures(Exception):
    """This address failed to authenticate too often; ``retry_after`` seconds to wait."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"too many failed authentication attempts from this address for this "
            f"partition; try again in {retry_after} s"
        )
        self.retry_after = retry_after


def peer_host(address: Any) -> str:
    """The part of a transport's peer address that identifies the client: its IP."""
    host = getattr(address, "host", None)
    return str(host) if host is not None else str(address)


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
        max_failures: int = 10,
        window: float = 60.0,
    ) -> None:
        self.router = router
        self._verify = verify if verify is not None else verify_now
        self._key = urandom(32)
        self.successes = 0
        self.failures = 0
        #: Attempts refused because their address had failed too often.
        self.refused = 0
        self.max_failures = max_failures
        self.window = window
        #: Per (client address, partition), the times of its recent failures
        #: (router.clock seconds).
        self._failed: OrderedDict[tuple[str, bytes], deque[float]] = OrderedDict()
        #: Per (client address, partition), password checks still running.
        self._checking: dict[tuple[str, bytes], int] = {}

    def _recent(self, peer: tuple[str, bytes], now: float) -> Optional[deque[float]]:
        times = self._failed.get(peer)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failed[peer]
            return None
        return times

    def _blocked(self, peer: Optional[tuple[str, bytes]]) -> None:
        """Raise TooManyFailures if ``peer`` (address, partition) has used up its failures."""
        if peer is None or not self.max_failures:
            return
        if peer not in self._failed and peer not in self._checking:
            return  # the usual case: nothing to count
        now = self.router.clock.seconds()
        times = self._recent(peer, now)
        failed = 0 if times is None else len(times)
        if failed + self._checking.get(peer, 0) >= self.max_failures:
            self.refused += 1
            if times is not None and failed >= self.max_failures:
                wait = times[0] + self.window - now
            else:
                wait = 1.0  # checks still running: their outcome decides
            raise TooManyFailures(max(1, math.ceil(wait)))

    def _outcome(self, ok: bool, peer: Optional[tuple[str, bytes]]) -> bool:
        if ok:
            self.successes += 1
            return True
        self.failures += 1
        if peer is not None and self.max_failures:
            now = self.router.clock.seconds()
            times = self._recent(peer, now)
            if times is None:
                times = self._failed[peer] = deque(maxlen=self.max_failures)
                if len(self._failed) > MAX_TRACKED:
                    self._evict(now)
            times.append(now)
            self._failed.move_to_end(peer)
        return False

    def _evict(self, now: float) -> None:
        """Forget the least recently failing entry that is not blocking anyone."""
        for key, times in self._failed.items():
            if len(times) < self.max_failures or times[0] <= now - self.window:
                del self._failed[key]
                return
        self._failed.popitem(last=False)  # every entry blocks: the oldest goes

    def anonymous(self, partition: bytes) -> bool:
        """Whether a connection with no credentials may use ``partition``."""
        policy = self.router.policies.get(partition)
        return policy is not None and policy.anonymous

    def check(
        self, partition: bytes, password: bytes, peer: Optional[str] = None
    ) -> Union[bool, Deferred]:
        """Whether ``password`` opens ``partition``: a bool now, or a Deferred firing with one.

        A partition without a password opens with any password if it allows
        anonymous access (as Redis's ``nopass`` user), else with none.
        ``peer`` (see :func:`peer_host`) is the client's address, whose
        failures on ``partition`` are counted; raises :class:`TooManyFailures`
        when it has failed there too often.
        """
        policy = self.router.policies.get(partition)
        # Names that are not partitions count as one: made-up names must not
        # fill the table (or push a blocked entry out of it).
        key = None if peer is None else (peer, partition if policy is not None else b"")
        self._blocked(key)
        if policy is None:
            return self._outcome(False, key)
        if policy.password_hash is None:
            if policy.anonymous:
                return True
            return self._outcome(False, key)
        tag = hmac.new(self._key, partition + b"\x00" + password, hashlib.sha256).digest()
        if tag in policy.verified:
            return self._outcome(True, key)
        if key is not None:
            self._checking[key] = self._checking.get(key, 0) + 1
        d = self._verify(password, policy.password_hash)
        d.addBoth(self._checked, key)
        d.addCallback(self._verified, policy, tag, key)
        return d

    def _checked(self, result: Any, key: Optional[tuple[str, bytes]]) -> Any:
        if key is not None:
            left = self._checking.get(key, 1) - 1
            if left > 0:
                self._checking[key] = left
            else:
                self._checking.pop(key, None)
        return result

    def _verified(
        self, ok: bool, policy: PartitionPolicy, tag: bytes, peer: Optional[tuple[str, bytes]]
    ) -> bool:
        if ok:
            if len(policy.verified) >= MAX_REMEMBERED:
                policy.verified.clear()
            policy.verified.add(tag)
        return self._outcome(bool(ok), peer)


def when_checked(answer: Union[bool, Deferred], then: Callable[[bool], Any]) -> Any:
    """Call ``then`` with the outcome now if it is known, else when it is."""
    if isinstance(answer, Deferred):
        return answer.addCallback(then)
    return then(answer)
