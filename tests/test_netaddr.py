"""The one way host:port is written: an IPv6 literal in brackets, in URLs, ZeroMQ addresses
and messages alike; a bracketed one is left as it is."""

from __future__ import annotations

import ipaddress
import socket

from pdserve import netaddr


def test_ipv6_literals_are_bracketed_once_and_others_left_alone():
    assert netaddr.url_host("::1") == "[::1]"
    assert netaddr.url_host("[::1]") == "[::1]"
    assert netaddr.url_host("fd00::2") == "[fd00::2]"
    assert netaddr.url_host("10.0.0.1") == "10.0.0.1"
    assert netaddr.url_host("node-3.example") == "node-3.example"
    assert netaddr.host_port("::", 8998) == "[::]:8998"
    assert netaddr.host_port("127.0.0.1", 8998) == "127.0.0.1:8998"
    assert netaddr.http_url("::1", 30000) == "http://[::1]:30000"
    assert netaddr.http_url("[::1]", 30000) == "http://[::1]:30000"
    assert netaddr.http_url("localhost", 30000) == "http://localhost:30000"


def test_a_listener_on_an_ipv6_literal_needs_an_ipv6_socket():
    assert netaddr.family("::1") == socket.AF_INET6
    assert netaddr.family("::") == socket.AF_INET6
    assert netaddr.family("0.0.0.0") == socket.AF_INET
    assert netaddr.family("localhost") == socket.AF_INET


def test_an_ipv6_wildcard_advertises_an_ipv6_address_or_asks_for_one():
    """`--host ::` listens on IPv6 only (HTTP, the KV data port): advertising the IPv4
    address left decode refused on the data port, its KV sent as ZeroMQ frames instead."""
    for wildcard in ("::", "[::]"):
        try:
            address = netaddr.advertised_host(wildcard, None)
        except ValueError as exc:  # a machine without a routable IPv6 address
            assert "no routable IPv6 address: pass --advertise-host" in str(exc)
            continue
        parsed = ipaddress.ip_address(address)
        assert parsed.version == 6 and not parsed.is_loopback and not parsed.is_link_local
    assert netaddr.advertised_host("::", "fd00::7") == "fd00::7"
