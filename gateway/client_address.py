"""The client's address, decided once per request: the socket peer, unless the peer is one
of `server.trusted_proxies`, in which case the rightmost X-Forwarded-For entry that is not
itself a trusted proxy.

Only a trusted proxy's word is taken: any caller can send an X-Forwarded-For header, so
believing it from an untrusted peer would let the caller choose the address the access log
records. Walking the header from the right (the entries the nearest proxies appended) and
stopping at the first untrusted one is the standard algorithm; the entries further left
were written by that untrusted party and prove nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Entries read from the right of X-Forwarded-For at most: a chain of proxies longer than
# this is not a deployment, and the cap bounds the work a hostile header can cause.
MAX_HOPS = 32
_PEER_CACHE_SIZE = 1024  # peers are few (the proxies); the cap bounds a scan of many


def parse_ip(text: str) -> IPAddress | None:
    """An address from an X-Forwarded-For entry or a peer: `1.2.3.4`, `1.2.3.4:5678`, `::1`,
    `[::1]:80`; IPv4-mapped IPv6 (`::ffff:1.2.3.4`, a dual-stack socket's view) as IPv4.
    None for anything else (a hostname, `unknown`, garbage)."""
    text = text.strip()
    if text.startswith("["):  # [v6] or [v6]:port
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not text[end + 1 :].startswith(":")):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # v4:port (a bare v6 has two colons or more)
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class TrustedProxies:
    """A set of networks (from `server.trusted_proxies`: addresses or CIDRs)."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        # The schema has validated each entry already; strict=False accepts 10.0.0.1/8.
        self.networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(e, strict=False) for e in entries)
        self._peers: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: IPAddress) -> bool:
        """Whether `ip` lies in one of the networks."""
        return any(ip in net for net in self.networks)  # version mismatch is simply False

    def trusts_peer(self, peer: str) -> bool:
        """`trusts` for a socket peer's text, cached: the same few proxies connect over and over."""
        known = self._peers.get(peer)
        if known is None:
            ip = parse_ip(peer)
            known = ip is not None and self.trusts(ip)
            if len(self._peers) >= _PEER_CACHE_SIZE:
                self._peers.clear()
            self._peers[peer] = known
        return known


NO_PROXIES = TrustedProxies()


def forwarded_for(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """Every X-Forwarded-For header of an ASGI request, joined in order (a list header sent
    on several lines means the same as one line, comma-joined)."""
    return ",".join(value.decode("latin-1") for name, value in headers if name == b"x-forwarded-for")


def client_address(peer: str | None, xff: str, trusted: TrustedProxies) -> str | None:
    """The client's address for a request from `peer` carrying X-Forwarded-For `xff`
    ("" when absent).

    An untrusted peer (or no trusted proxies at all): the peer. A trusted one: the rightmost
    entry that is not a trusted proxy. When every entry is trusted, the leftmost (the
    farthest hop known, itself a proxy of ours). An entry that is not an address stops the
    walk at the last good address to its right: it was written by a party that cannot be
    named, so nothing beyond it can be believed.
    """
    if peer is None or not trusted or not trusted.trusts_peer(peer):
        return peer
    if not xff:
        return peer
    entries = xff.rsplit(",", MAX_HOPS)
    if len(entries) > MAX_HOPS:
        entries[0] = ""  # the unread rest: treated as garbage, it stops the walk
    best = parse_ip(peer)
    for entry in reversed(entries):
        ip = parse_ip(entry)
        if ip is None:
            break
        best = ip
        if not trusted.trusts(ip):
            break
    return str(best) if best is not None else peer
