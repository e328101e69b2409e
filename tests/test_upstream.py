"""The upstream client (aiohttp) against real sockets: framing, pooling, TLS, proxies."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import pytest
from aiohttp.client_reqrep import ClientRequest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import SocketServer
from yarl import URL

from gateway.config import UpstreamConfig
from gateway.upstream import UpstreamClient, UpstreamError, _Connector

Reply = Callable[[bytes], tuple[bytes, bool]]  # request head -> (response bytes, close after)


class RawServer(SocketServer):
    """A socket server whose answers are written by hand, one thread per connection."""

    def __init__(self, reply: Reply, tls: ssl.SSLContext | None = None) -> None:
        self.reply = reply
        self.tls = tls
        self.heads: list[bytes] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            with conn:
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            need = int(line.split(b":")[1])
                            while len(buf) < need:
                                buf += conn.recv(65536)
                            buf = buf[need:]
                    self.heads.append(head)
                    data, close = self.reply(head)
                    conn.sendall(data)
                    if close:
                        return
        except (OSError, ssl.SSLError):
            return


@pytest.fixture
def raw() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def make(reply: Reply, tls: ssl.SSLContext | None = None) -> RawServer:
        servers.append(RawServer(reply, tls))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _client(**cfg: object) -> UpstreamClient:
    return UpstreamClient(UpstreamConfig(connect_timeout=1, read_timeout=2, **cfg))  # type: ignore[arg-type]


async def _fetch(client: UpstreamClient, url: str) -> tuple[int, bytes, list[bytes]]:
    resp = await client.send("POST", url, [("content-type", "application/json")], b"{}", "up")
    chunks = [chunk async for chunk in resp.chunks()]
    resp.close()
    return resp.status, b"".join(chunks), chunks


def test_content_length_chunked_and_close_delimited_bodies(raw: Callable[..., RawServer]) -> None:
    body = b'{"ok": true, "pad": "' + b"x" * 5000 + b'"}'
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:4000], body[4000:])
    )
    length = raw(
        lambda h: (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body), False)
    )
    chunks = raw(
        lambda h: (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n",
            False,
        )
    )
    until_close = raw(lambda h: (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + body, True))

    async def scenario() -> None:
        client = _client()
        for server in (length, chunks, until_close):
            for _ in range(2):
                status, got, _ = await _fetch(client, f"http://127.0.0.1:{server.port}/x")
                assert (status, got) == (200, body)
        await client.aclose()

    asyncio.run(scenario())
    assert length.connections == 1 and chunks.connections == 1  # kept alive and reused
    assert until_close.connections == 2


def test_request_framing_and_headers(raw: Callable[..., RawServer]) -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    server = raw(lambda h: (ok, False))

    async def scenario() -> None:
        client = _client()
        await _fetch(client, f"http://127.0.0.1:{server.port}/openai/v1/responses")
        await client.aclose()

    asyncio.run(scenario())
    head = server.heads[0].decode().lower()
    assert head.startswith("post /openai/v1/responses http/1.1")
    assert head.count("content-type:") == 1 and "user-agent" not in head
    assert "accept-encoding" not in head and "content-length: 2" in head


def test_connection_closed_by_upstream_while_idle(raw: Callable[..., RawServer]) -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    server = raw(lambda h: (ok, True))  # answers, then closes the idle connection

    async def scenario() -> None:
        client = _client()
        for _ in range(3):
            status, got, _ = await _fetch(client, f"http://127.0.0.1:{server.port}/x")
            assert (status, got) == (200, b"{}")
            await asyncio.sleep(0.05)
        await client.aclose()

    asyncio.run(scenario())
    assert server.connections == 3


def test_pool_exhaustion_is_503(raw: Callable[..., RawServer]) -> None:
    slow = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n"  # never ends
    server = raw(lambda h: (slow, False))

    async def scenario() -> None:
        client = _client(max_connections=1, pool_timeout=0.2)
        url = f"http://127.0.0.1:{server.port}/x"
        held = await client.send("POST", url, [], b"{}", "up")
        with pytest.raises(UpstreamError) as info:
            await client.send("POST", url, [], b"{}", "up")
        assert info.value.error.status == 503
        assert info.value.error.code == "upstream_pool_exhausted"
        held.close()
        await client.aclose()

    asyncio.run(scenario())


def _self_signed(tmp: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA, and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return ca_file, ctx


def test_tls_with_a_private_ca(raw: Callable[..., RawServer], tmp_path: Path) -> None:
    ca_file, server_ctx = _self_signed(tmp_path)
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    server = raw(lambda h: (ok, False), tls=server_ctx)
    url = f"https://127.0.0.1:{server.port}/x"

    async def scenario() -> None:
        trusted = _client(ca_file=str(ca_file))
        assert (await _fetch(trusted, url))[:2] == (200, b"{}")
        await trusted.aclose()
        default = _client()  # the system store does not know this CA
        with pytest.raises(UpstreamError) as info:
            await _fetch(default, url)
        assert info.value.error.status == 502
        await default.aclose()

    asyncio.run(scenario())


def test_proxy_from_the_environment(
    raw: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    proxy = raw(lambda h: (ok, False))  # answers as the proxy would after forwarding
    for var in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    target = "http://contoso-upstream.invalid:8443/openai/v1/responses?api-version=x"

    async def scenario() -> None:
        via_env = _client(trust_env=True)
        assert (await _fetch(via_env, target))[:2] == (200, b"{}")
        await via_env.aclose()
        direct = _client(trust_env=False)
        with pytest.raises(UpstreamError):  # without trust_env the name is resolved directly
            await _fetch(direct, target)
        await direct.aclose()

    asyncio.run(scenario())
    assert proxy.heads[0].startswith(b"POST " + target.encode() + b" HTTP/1.1")


def test_a_body_read_twice_and_interim_answers(raw: Callable[..., RawServer]) -> None:
    """The breaker reads an error body before the relay does; a 100 is skipped; 204 is empty."""
    err = b'{"error": {"code": "429"}}'
    answers = iter(
        [
            b"HTTP/1.1 429 Too Many\r\ncontent-length: %d\r\n\r\n%s" % (len(err), err),
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]",
        ]
    )
    server = raw(lambda h: (next(answers), False))

    async def scenario() -> None:
        client = _client()
        url = f"http://127.0.0.1:{server.port}/x"
        resp = await client.send("POST", url, [], b"{}", "up")
        assert (resp.status, await resp.read(), await resp.read()) == (429, err, err)
        resp.close()
        assert (await _fetch(client, url))[:2] == (200, b"{}")
        assert (await _fetch(client, url))[:2] == (204, b"")
        assert (await _fetch(client, url))[:2] == (200, b"[]")
        assert client.in_use == 0
        await client.aclose()

    asyncio.run(scenario())
    assert server.connections == 1  # every answer ended cleanly: one connection throughout


def test_a_header_with_a_line_break_is_never_sent(raw: Callable[..., RawServer]) -> None:
    server = raw(lambda h: (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", False))

    async def scenario() -> None:
        client = _client()
        url = f"http://127.0.0.1:{server.port}/x"
        for bad in (("x-a", "1\r\nx-injected: 1"), ("x-a\nx-b", "1")):
            with pytest.raises(UpstreamError) as info:
                await client.send("POST", url, [bad], b"{}", "up")
            # The client's input, not the upstream: a shaped 400, never a 502.
            assert info.value.error.status == 400
        await client.aclose()

    asyncio.run(scenario())
    assert server.heads == []


class ConnectProxy(SocketServer):
    """An HTTP proxy that only tunnels (CONNECT), as egress proxies in front of Azure do."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            line = head.split(b"\r\n")[0]
            self.requests.append(line)
            host, port = line.split()[1].decode().rsplit(":", 1)
            with socket.create_connection((host, int(port))) as up:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                threading.Thread(target=self._pipe, args=(up, conn), daemon=True).start()
                self._pipe(conn, up)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def test_https_through_a_tunnelling_proxy_from_the_environment(
    raw: Callable[..., RawServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Azure behind an egress proxy: CONNECT once, TLS to Azure inside, the tunnel reused."""
    ca_file, server_ctx = _self_signed(tmp_path)
    server = raw(lambda h: (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", False), server_ctx)
    proxy = ConnectProxy()
    for var in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    url = f"https://127.0.0.1:{server.port}/openai/v1/responses"

    async def scenario() -> None:
        client = _client(trust_env=True, ca_file=str(ca_file))
        for _ in range(3):
            assert (await _fetch(client, url))[:2] == (200, b"{}")
        await client.aclose()

    asyncio.run(scenario())
    assert proxy.requests == [b"CONNECT 127.0.0.1:%d HTTP/1.1" % server.port]
    assert server.connections == 1
    assert [h.split(b"\r\n")[0] for h in server.heads] == [
        b"POST /openai/v1/responses HTTP/1.1"
    ] * 3


class _TwoAddresses(aiohttp.abc.AbstractResolver):
    """Resolves every name to 127.0.0.2 (nothing listens there) and then 127.0.0.1."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
        return [
            {"hostname": host, "host": ip, "port": port, "family": socket.AF_INET, "proto": 6,
             "flags": socket.AI_NUMERICHOST}
            for ip in ("127.0.0.2", "127.0.0.1")
        ]  # fmt: skip

    async def close(self) -> None:
        return None


def test_the_connector_tries_each_address_in_order(raw: Callable[..., RawServer]) -> None:
    """The gateway's connector (one create_connection per address): a refused address is
    skipped, and when every address refuses, the error is aiohttp's connect error."""
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    server = raw(lambda h: (ok, False))
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    closed_port = refused.getsockname()[1]
    refused.close()

    async def scenario() -> None:
        connector = _Connector(resolver=_TwoAddresses(), happy_eyeballs_delay=None)
        timeout = aiohttp.ClientTimeout(sock_connect=2)
        loop = asyncio.get_running_loop()
        req = ClientRequest("GET", URL(f"http://upstream.test:{server.port}"), loop=loop)
        conn = await connector.connect(req, traces=[], timeout=timeout)
        assert conn.transport is not None
        assert conn.transport.get_extra_info("peername") == ("127.0.0.1", server.port)
        conn.close()
        dead = ClientRequest("GET", URL(f"http://upstream.test:{closed_port}"), loop=loop)
        with pytest.raises(aiohttp.ClientConnectorError):
            await connector.connect(dead, traces=[], timeout=timeout)
        await connector.close()

    asyncio.run(scenario())


def test_preconnect_opens_idle_connections_when_traffic_grows(
    raw: Callable[..., RawServer],
) -> None:
    """A request that must open a connection while another is in flight (a burst) makes
    the client open one more in the background; the next request finds it ready. A lone
    request after a quiet spell opens only its own; ``preconnect: 0`` opens none."""
    slow = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n"  # never ends

    async def scenario(preconnect: int) -> tuple[int, int, int]:
        server = raw(lambda h: (slow, False))
        url = f"http://127.0.0.1:{server.port}/x"
        client = _client(preconnect=preconnect)
        first = await client.send("POST", url, [], b"{}", "up")  # alone: nothing warmed
        await asyncio.sleep(0.2)
        alone = server.connections
        second = await client.send("POST", url, [], b"{}", "up")  # grows: one warmed
        await asyncio.sleep(0.2)
        grown = server.connections
        third = await client.send("POST", url, [], b"{}", "up")  # takes the warmed one
        await asyncio.sleep(0.2)
        after = server.connections
        assert len(server.heads) == 3  # a warmed connection carries nothing until used
        for resp in (first, second, third):
            resp.close()
        await client.aclose()
        return alone, grown, after

    assert asyncio.run(scenario(4)) == (1, 3, 3)  # the third rode the warmed connection
    assert asyncio.run(scenario(0)) == (1, 2, 3)
