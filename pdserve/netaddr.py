"""Which address a listener advertises to peers on other machines (no traffic is sent).

A listener binds `--host`; peers are told `--advertise-host` when given, else the bound
host, and for a wildcard bind this machine's routable address of the wildcard's family
(IPv4 for 0.0.0.0, IPv6 for ::): the source address of its default route, else the first
interface address that is neither loopback nor link-local.
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


def advertisable(flag: str, host: str | None) -> str | None:
    """Why `host`, given as `flag`, cannot be told to peers (None where it can): a wildcard
    is where to listen, not where to connect (peers on this machine reached it by luck)."""
    if host is not None and is_wildcard(host):
        return (
            f"{flag} {host!r} is a wildcard, not an address peers can reach: give this "
            "machine's address, or leave it unset"
        )
    return None


def _is_local(address: str) -> bool:
    """Loopback, or IPv6 link-local (no peer reaches fe80:: without a zone)."""
    try:
        parsed = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    return parsed.is_loopback or (parsed.version == 6 and parsed.is_link_local)


def _default_route_source(family: socket.AddressFamily) -> str | None:
    """The source address the kernel would use towards a public address: a route lookup
    (UDP connect sends no packet)."""
    # Documentation addresses (TEST-NET-1, 2001:db8::/32): only the route table is consulted.
    probe = "2001:db8::1" if family == socket.AF_INET6 else "192.0.2.1"
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((probe, 9))
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if _is_local(address) else address


def _interface_addresses_v6() -> list[str]:
    """Global IPv6 addresses of this network namespace's interfaces."""
    try:
        with open("/proc/net/if_inet6") as f:
            rows = [line.split()[0] for line in f]
    except OSError:
        return []
    addresses = [str(ipaddress.IPv6Address(bytes.fromhex(row))) for row in rows]
    return [a for a in addresses if not _is_local(a)]


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
            if not _is_local(address):
                addresses.append(address)
    return addresses


def routable_address(family: socket.AddressFamily = socket.AF_INET) -> str:
    """This machine's address of `family` for peers; ValueError when it has none but
    loopback (and link-local)."""
    address = _default_route_source(family)
    if address is not None:
        return address
    v6 = family == socket.AF_INET6
    addresses = _interface_addresses_v6() if v6 else _interface_addresses()
    if not addresses:
        raise ValueError(
            f"bound to a wildcard address but this machine has no routable IPv{6 if v6 else 4} "
            "address: pass --advertise-host"
        )
    return addresses[0]


def advertised_host(bind_host: str, advertise_host: str | None) -> str:
    """What peers are told: `advertise_host`, else the bound host, else (wildcard) the
    machine's routable address."""
    if advertise_host:
        return advertise_host
    return routable_address(family(bind_host)) if is_wildcard(bind_host) else bind_host


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


def tcp_endpoint_error(endpoint: str) -> str | None:
    """Why `endpoint` is not a ZeroMQ "tcp://host:port" address a peer can connect to
    (a host, an IPv6 literal in brackets, a port in [1, 65535]), or None."""
    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not endpoint.startswith("tcp://") or not sep or not host:
        return f"{endpoint!r} is not tcp://host:port"
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        return f"{endpoint!r}: port {port!r} is not in [1, 65535]"
    bare = host.removeprefix("[").removesuffix("]")
    if ":" in host and host == bare:
        return f"{endpoint!r}: an IPv6 host goes in brackets (tcp://[{bare}]:{port})"
    malformed = host not in (bare, f"[{bare}]") or not bare or "*" in bare
    if malformed or any(c.isspace() or c in "[]/" for c in bare):
        return f"{endpoint!r}: host {host!r} is not an address"
    return None


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
