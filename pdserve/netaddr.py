"""Which address a listener advertises to peers on other machines (no traffic is sent).

A listener binds `--host`; peers are told `--advertise-host` when given, else the bound
host, and for a wildcard bind (0.0.0.0, ::) this machine's routable address: the source
address of its default route, else the first non-loopback interface address.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
_SIOCGIFADDR = 0x8915


def is_wildcard(host: str) -> bool:
    return host in WILDCARDS


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _default_route_source() -> str | None:
    """The source address the kernel would use towards a public address: a route lookup
    (UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route table is consulted
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if _is_loopback(address) else address


def _interface_addresses() -> list[str]:
    """IPv4 addresses of this network namespace's interfaces, loopback excluded."""
    addresses = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on it
            address = socket.inet_ntoa(answer[20:24])
            if not _is_loopback(address):
                addresses.append(address)
    return addresses


def routable_address() -> str:
    """This machine's address for peers; ValueError when it has none but loopback."""
    address = _default_route_source()
    if address is not None:
        return address
    addresses = _interface_addresses()
    if not addresses:
        raise ValueError(
            "bound to a wildcard address but this machine has no routable address: "
            "pass --advertise-host"
        )
    return addresses[0]


def advertised_host(bind_host: str, advertise_host: str | None) -> str:
    """What peers are told: `advertise_host`, else the bound host, else (wildcard) the
    machine's routable address."""
    if advertise_host:
        return advertise_host
    return routable_address() if is_wildcard(bind_host) else bind_host


def url_host(host: str) -> str:
    """The host as a URL or a ZeroMQ tcp:// address takes it: an IPv6 literal in brackets
    (ZeroMQ read "tcp://::1:5555" as no device at all, and http://::1:80 is no URL)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def host_port(host: str, port: int) -> str:
    """host:port for messages and URLs, an IPv6 literal in brackets: "[::1]:8998"."""
    return f"{url_host(host)}:{port}"


def http_url(host: str, port: int) -> str:
    """The base URL of an HTTP listener, e.g. "http://[::1]:8998"."""
    return f"http://{host_port(host, port)}"


def family(host: str) -> socket.AddressFamily:
    """The socket family a listener on `host` needs: AF_INET6 for an IPv6 literal."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def local_host(bind_host: str) -> str:
    """An address on which this machine reaches its own listener bound to `bind_host`."""
    if not is_wildcard(bind_host):
        return bind_host
    return "::1" if ":" in bind_host else "127.0.0.1"


def cannot_listen(flag: str, port: int, address: str, exc: Exception) -> OSError:
    """The error of a listener that could not bind (its port taken, say), naming the flag
    that set the port: a server reports it as a failed start, not a traceback."""
    return OSError(f"{flag} {port}: cannot listen on {address}: {exc}")
