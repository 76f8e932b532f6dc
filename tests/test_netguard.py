"""The address guard: which addresses are public, and that every connection is checked."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from servers.files import FileServer
from worker.netguard import PrivateAddressRefused, guarded_http_client, is_public_address
from worker.settings import Settings

LOCAL_ONLY = [ipaddress.ip_network("127.0.0.1/32")]
TIMEOUT = httpx.Timeout(2.0)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("93.184.215.14", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),  # mapped form of a public address is that address
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("172.31.255.255", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # shared address space (carrier-grade NAT)
        ("100.127.255.254", False),
        ("0.0.0.0", False),
        ("0.1.2.3", False),
        ("192.0.0.9", False),
        ("192.0.2.1", False),
        ("198.18.0.1", False),
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("::127.0.0.1", False),  # IPv4-compatible
        ("::10.0.0.1", False),
        ("fe80::1", False),
        ("fec0::1", False),  # site-local
        ("fc00::1", False),
        ("fd12:3456::1", False),
        ("ff02::1", False),
        ("2001:db8::1", False),
        ("2002:7f00:1::1", False),  # 6to4 around 127.0.0.1
        ("2002:a00:1::1", False),  # 6to4 around 10.0.0.1
        ("64:ff9b::7f00:1", False),  # NAT64 around 127.0.0.1
        ("64:ff9b::808:808", True),  # NAT64 around 8.8.8.8
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


@pytest.fixture(scope="module")
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        srv.add("/hello.txt", b"hello", "text/plain")
        yield srv


def client(**kwargs: Any) -> httpx.Client:
    settings = Settings(max_redirects=3)
    kwargs.setdefault("allow_private", False)
    return guarded_http_client(settings, timeout=TIMEOUT, **kwargs)


def test_loopback_is_refused_by_default(server: FileServer) -> None:
    with client() as http, pytest.raises(PrivateAddressRefused) as info:
        http.get(server.url("/hello.txt"))
    assert info.value.host == "127.0.0.1"


def test_localhost_name_is_refused_by_default(server: FileServer) -> None:
    with client() as http, pytest.raises(PrivateAddressRefused) as info:
        http.get(server.url("/hello.txt", host="localhost"))
    assert info.value.host == "localhost"


def test_allow_private_and_allowed_networks_reach_the_server(server: FileServer) -> None:
    with client(allow_private=True) as http:
        assert http.get(server.url("/hello.txt")).content == b"hello"
    with client(allowed_networks=LOCAL_ONLY) as http:
        assert http.get(server.url("/hello.txt")).content == b"hello"


def test_redirect_to_another_private_address_is_refused(server: FileServer) -> None:
    target = server.url("/hello.txt", host="127.0.0.2")
    with client(allowed_networks=LOCAL_ONLY) as http, pytest.raises(PrivateAddressRefused) as info:
        http.get(server.url(f"/redirect?to={target}"), follow_redirects=True)
    assert info.value.host == "127.0.0.2"


def _fake_dns(
    monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[list[str]]]
) -> dict[str, int]:
    """Serve names from ``answers`` (one list of addresses per successive lookup)."""
    real = socket.getaddrinfo
    calls: dict[str, int] = {}

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        n = calls.get(host, 0)
        calls[host] = n + 1
        addresses = answers[host][min(n, len(answers[host]) - 1)]
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, int(port))) for addr in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


def test_connects_to_the_checked_address_without_resolving_again(
    server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # First answer allowed, every later one private: a check-then-resolve-again client
    # would connect to 127.0.0.2 (nothing listens there) or be refused.
    calls = _fake_dns(monkeypatch, {"rebind.test": [["127.0.0.1"], ["127.0.0.2"]]})
    with client(allowed_networks=LOCAL_ONLY) as http:
        response = http.get(server.url("/hello.txt", host="rebind.test"))
    assert response.content == b"hello"
    assert calls["rebind.test"] == 1
    assert server.requests_to("/hello.txt")[-1].headers["host"] == f"rebind.test:{server.port}"


def test_any_private_address_in_the_answer_refuses_the_name(
    server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_dns(monkeypatch, {"mixed.test": [["8.8.8.8", "10.0.0.1"]]})
    with client() as http, pytest.raises(PrivateAddressRefused) as info:
        http.get(server.url("/hello.txt", host="mixed.test"))
    assert info.value.address == "10.0.0.1"


def test_environment_proxy_does_not_bypass_the_guard(
    server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FileServer() as proxy:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy.base_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with client() as http, pytest.raises(PrivateAddressRefused):
            http.get(server.url("/hello.txt"))
        with client(allowed_networks=LOCAL_ONLY) as http:
            assert http.get(server.url("/hello.txt")).content == b"hello"
        assert proxy.requests == []
