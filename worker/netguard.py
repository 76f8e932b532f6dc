"""SSRF protection where it cannot be sidestepped: at the moment a TCP connection opens.

Checking a URL's host before the request is not enough: a redirect can point anywhere,
and a hostname can resolve to a public address for the check and to 127.0.0.1 for the
connect (DNS rebinding). So the guarded client's network backend resolves every host
itself, refuses when any address is not public, and connects to the very address it
checked. TLS still verifies the original hostname: httpcore passes it to ``start_tls``
as ``server_hostname``, independently of the address the socket connected to.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import httpcore
import httpx

if TYPE_CHECKING:
    from worker.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Belt and braces next to ipaddress's own flags, whose exact ranges have moved between
# Python patch releases (e.g. 192.0.0.0/24 and the 100.64/10 shared space).
_BLOCKED: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "100::/64",
        "2001:db8::/32",
        "64:ff9b:1::/48",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class PrivateAddressRefused(httpx.ConnectError):
    """A connection to a non-public address was refused; ``host`` is what was asked for."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to non-public address {address}")
        self.host = host
        self.address = address


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses, whatever form they come in."""
    if isinstance(ip, ipaddress.IPv6Address):
        # ::ffff:a.b.c.d, ::a.b.c.d and NAT64's 64:ff9b::a.b.c.d reach the IPv4 host
        # itself (NAT64 is how IPv6-only networks reach all of IPv4): judge that host.
        direct = ip.ipv4_mapped or _ipv4_compatible(ip) or _nat64(ip)
        if direct is not None:
            return is_public_address(direct)
        # 6to4 and Teredo carry an IPv4 address that a relay will forward to.
        tunneled = _tunneled_ipv4(ip)
        if tunneled is not None and not is_public_address(tunneled):
            return False
    return _is_plainly_public(ip)


def _is_plainly_public(ip: IPAddress) -> bool:
    if any(ip in net for net in _BLOCKED if net.version == ip.version):
        return False
    flags = (
        ip.is_private,
        ip.is_loopback,
        ip.is_link_local,
        ip.is_reserved,
        ip.is_multicast,
        ip.is_unspecified,
        isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local,
    )
    return ip.is_global and not any(flags)


def _ipv4_compatible(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    value = int(ip)
    # :: and ::1 are not IPv4-compatible forms but the unspecified and loopback addresses.
    if value >> 32 == 0 and value > 1:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def _tunneled_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def _nat64(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None


def _parse_address(text: str) -> IPAddress:
    # getaddrinfo returns "fe80::1%eth0" for scoped addresses; the scope is not the address.
    return ipaddress.ip_address(text.split("%", 1)[0])


class GuardedBackend(httpcore.NetworkBackend):
    """Resolve, check every address, then connect to a checked address (never re-resolve)."""

    def __init__(self, *, allow_private: bool, allowed_networks: Sequence[IPNetwork] = ()) -> None:
        self._allow_private = allow_private
        self._allowed = tuple(allowed_networks)
        self._inner = httpcore.SyncBackend()

    def allowed(self, ip: IPAddress) -> bool:
        if self._allow_private or is_public_address(ip):
            return True
        return any(ip in net for net in self._allowed if net.version == ip.version)

    def resolve(self, host: str, port: int) -> list[str]:
        """Every address of ``host``, refusing all of them if a single one is not allowed.

        Refusing on any (not only the first) keeps a mixed answer such as
        [public, 127.0.0.1] from reaching the private one through a connect fallback.
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses: list[str] = []
        for info in infos:
            text = str(info[4][0])
            if not self.allowed(_parse_address(text)):
                raise PrivateAddressRefused(host, text)
            if text not in addresses:
                addresses.append(text)
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve {host}: no addresses")
        return addresses

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        last: httpcore.ConnectError | None = None
        for address in self.resolve(host, port):
            try:
                # An IP literal: socket.create_connection does no further DNS lookup.
                return self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                last = exc
        assert last is not None  # resolve() never returns an empty list
        raise last

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed through the guarded client")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport with the connection pool swapped for one on GuardedBackend.

    HTTPTransport takes no ``network_backend`` argument (httpx 0.28), but it keeps all the
    exception mapping and response wrapping we want; so we let it build itself, then
    replace its pool with an identical one that connects through the guard. No proxy is
    ever configured here: a proxy would make the guard check the proxy, not the target.
    """

    def __init__(self, backend: GuardedBackend, *, limits: httpx.Limits = _LIMITS) -> None:
        ssl_context = httpx.create_ssl_context(trust_env=False)
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


def guarded_http_client(
    settings: Settings,
    *,
    timeout: httpx.Timeout,
    allow_private: bool,
    allowed_networks: Sequence[IPNetwork] = (),
) -> httpx.Client:
    """An httpx.Client whose every connection (redirects included) passes the address guard.

    ``allowed_networks`` punches exact holes (tests allow 127.0.0.1/32 and nothing else).
    Redirects are off by default; callers that want them pass ``follow_redirects=True``
    per request and get at most ``settings.max_redirects`` hops.
    """
    backend = GuardedBackend(allow_private=allow_private, allowed_networks=allowed_networks)
    return httpx.Client(
        transport=GuardedTransport(backend),
        timeout=timeout,
        max_redirects=settings.max_redirects,
        # Environment proxies would connect to the proxy, out of the guard's sight.
        trust_env=False,
        headers={"User-Agent": "bgswap"},
    )
