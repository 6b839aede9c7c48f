"""Stateless refusal of a handshake, sans-I/O: "too busy, come back in N ms".

A server whose ``max_handshakes`` are under way answers a further client Initial with one
Initial packet carrying a transport CONNECTION_CLOSE (CONNECTION_REFUSED, 0x02; RFC 9000
10.2.3 and 17.2.2 let a server close in an Initial), protected with the Initial keys of
the client's Destination CID (RFC 9001 5.2), whose reason phrase says when to come back:
``overloaded; retry-after-ms=1500``. No connection state is kept. The client's engine
reports the close at once (not after its connect timeout); ``parse_retry_after`` turns the
reason back into ``cyphonic.errors.Overloaded``.

``RefusalGate`` decides whether to send one (a token bucket: refusals cost a packet
encryption each, a flood of Initials must not turn into a flood of work) and the
retry-after: the backlog (handshakes under way, plus the clients refused lately, who come
back) divided by the recent completion rate, the time it takes to drain, clamped to
``RETRY_AFTER_S``. A refusal is never larger than the
Initial that provoked it (RFC 9000 8: no amplification; a client Initial is >= 1200 bytes,
a refusal under 100).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicPacketBuilder

CONNECTION_REFUSED = int(QuicErrorCode.CONNECTION_REFUSED)
RETRY_AFTER_S = (0.25, 10.0)
"""Bounds of the retry-after a refusal names."""
REFUSALS_PER_S = 2000.0
"""Token bucket of refusals sent (burst: one second's worth); beyond it Initials are dropped
silently, as before (the client retransmits and may be refused then)."""
MIN_RATE_PER_S = 50.0
"""The completion rate assumed when fewer handshakes completed lately (the first second of
a storm, or a flood of half-open ones): a full handshake costs a few ms of CPU."""
_REASON = "overloaded; retry-after-ms={}"
_REASON_RE = re.compile(r"retry-after-ms=(\d{1,7})")


def encode_refusal(
    *, version: int, client_dcid: bytes, client_scid: bytes, retry_after_s: float
) -> bytes:
    """An Initial packet from the server to a client whose first Initial had Destination CID
    ``client_dcid`` (the Initial keys) and Source CID ``client_scid`` (addressed to it),
    closing with CONNECTION_REFUSED and the retry-after in its reason phrase."""
    crypto = CryptoPair()
    crypto.setup_initial(cid=client_dcid, is_client=False, version=version)
    builder = QuicPacketBuilder(
        host_cid=os.urandom(8),
        peer_cid=client_scid,
        version=version,
        is_client=False,
        max_datagram_size=1200,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    reason = _REASON.format(max(1, round(retry_after_s * 1000))).encode()
    buf = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE)
    buf.push_uint_var(CONNECTION_REFUSED)
    buf.push_uint_var(0)  # frame type: none in particular
    buf.push_uint_var(len(reason))
    buf.push_bytes(reason)
    datagrams, _ = builder.flush()
    return datagrams[0]


def parse_retry_after(error_code: int, reason: str) -> float | None:
    """The retry-after (seconds) of a refusal's close, None if the close is not one."""
    if error_code != CONNECTION_REFUSED:
        return None
    match = _REASON_RE.search(reason)
    if match is None:
        return None
    low, high = RETRY_AFTER_S
    return min(high, max(low, int(match.group(1)) / 1000))


@dataclass
class RefusalGate:
    """Whether to answer a surplus Initial with a refusal, and the retry-after it names.

    The endpoint reports each completed server handshake (``completed``); completions and
    refusals are counted with exponential decay (half-life ``window_s``).
    """

    rate_per_s: float = REFUSALS_PER_S
    window_s: float = 2.0
    _tokens: float = field(default=REFUSALS_PER_S, init=False)
    _refill_at: float = field(default=0.0, init=False)
    _done: float = field(default=0.0, init=False)
    """Decayed count of completed handshakes."""
    _refused: float = field(default=0.0, init=False)
    """Decayed count of refusals sent."""
    _decayed_at: float = field(default=0.0, init=False)

    def completed(self, *, now: float) -> None:
        self._decay(now)
        self._done += 1.0

    def completion_rate(self, *, now: float) -> float:
        """Handshakes completed per second, recently."""
        self._decay(now)
        return self._done * math.log(2) / self.window_s

    def retry_after(self, handshaking: int, *, now: float) -> float:
        """Seconds for the backlog to drain at the recent rate (clamped): ``handshaking``
        under way and the clients refused in about the last ``window_s``."""
        low, high = RETRY_AFTER_S
        rate = max(MIN_RATE_PER_S, self.completion_rate(now=now))
        return min(high, max(low, (handshaking + self._refused) / rate))

    def take(self, *, now: float) -> bool:
        """One refusal may be sent now (a token), or False: drop silently."""
        burst = self.rate_per_s
        self._tokens = min(burst, self._tokens + (now - self._refill_at) * self.rate_per_s)
        self._refill_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        self._decay(now)
        self._refused += 1.0
        return True

    def _decay(self, now: float) -> None:
        if now > self._decayed_at:
            factor = 0.5 ** ((now - self._decayed_at) / self.window_s)
            self._done *= factor
            self._refused *= factor
            self._decayed_at = now
