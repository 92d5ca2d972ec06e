"""Client ID metadata documents (CIMD): an OAuth client whose client id is an HTTPS URL is
described by the JSON document at that URL, which the authorization server fetches.

The fetch is an outbound request that anyone on the internet can make this server start, so it
is fenced in: HTTPS only, to a name that resolves to public addresses only (no private,
loopback, link-local, multicast or reserved ones; the connection goes to the very address that
was checked, so a second DNS answer cannot swap it), at most `max_bytes` read and `timeout`
seconds in all, no redirects followed; what was fetched is cached for a while. Callers:
`kernelpool.mcp.oauth` (the provider's `get_client`).

For tests only, `test_resolve` maps names to addresses that are then trusted as they are (the
test's own HTTPS server on loopback) and `test_ca` adds a CA to the system's; the refusal of
private addresses is exercised with every other name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpcore2


class ClientDocumentError(Exception):
    """Why a client metadata document was not accepted (said to the person and the client)."""


def is_document_url(client_id: str) -> bool:
    """Whether a client id names a metadata document (an https URL with a path) rather than a
    registration of ours."""
    parts = urllib.parse.urlsplit(client_id)
    return parts.scheme == "https" and bool(parts.netloc) and parts.path not in ("", "/")


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local or ip.is_private)


class _VettedBackend(httpcore2.AsyncNetworkBackend):
    """Connects only to an address it has checked (or one the tests' `test_resolve` names)."""

    def __init__(self, test_resolve: dict[str, str]) -> None:
        self._inner = httpcore2.AnyIOBackend()
        self._test_resolve = test_resolve

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore2.AsyncNetworkStream:
        address = await self.resolve(host)
        return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                             socket_options=socket_options)

    async def resolve(self, host: str) -> str:
        if host in self._test_resolve:
            return self._test_resolve[host]
        try:
            addresses = [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            infos = await asyncio.get_running_loop().getaddrinfo(host, 443, type=socket.SOCK_STREAM)
            addresses = [str(info[4][0]) for info in infos]
        if not addresses:
            raise ClientDocumentError(f"{host} does not resolve")
        refused = [a for a in addresses if not _public(a)]
        if refused:
            raise ClientDocumentError(f"{host} resolves to a private, loopback or link-local address ({refused[0]}): refused")
        return addresses[0]

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class ClientDocuments:
    """Fetches and caches client metadata documents."""

    def __init__(self, *, test_ca: Path | None = None, test_resolve: Iterable[str] = (), max_bytes: int = 64 * 1024,
                 timeout: float = 5.0, cache_seconds: float = 300.0, max_cached: int = 1000) -> None:
        context = ssl.create_default_context()
        if test_ca is not None:
            context.load_verify_locations(cafile=str(test_ca))
        pairs = dict(item.split("=", 1) for item in test_resolve)
        self._backend = _VettedBackend({k.strip(): v.strip() for k, v in pairs.items()})
        self._pool = httpcore2.AsyncConnectionPool(ssl_context=context, network_backend=self._backend,
                                                   max_connections=20, keepalive_expiry=0)
        self._max_bytes, self._timeout = max_bytes, timeout
        self._cache_seconds, self._max_cached = cache_seconds, max_cached
        self._cache: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    async def fetch(self, url: str) -> dict[str, Any]:
        """The document at `url`, checked (its `client_id` is `url`, it has redirect URIs and asks
        for no client secret); raises ClientDocumentError."""
        cached = self._cache.get(url)
        if cached is not None and cached[0] > time.monotonic():
            self._cache.move_to_end(url)
            return cached[1]
        _check_url(url)
        try:
            async with asyncio.timeout(self._timeout):
                body = await self._get(url)
        except TimeoutError:
            raise ClientDocumentError(f"fetching {url} took longer than {self._timeout:g} s") from None
        except httpcore2.ConnectError as exc:
            raise ClientDocumentError(f"fetching {url} failed: {exc}") from None
        except (httpcore2.ProtocolError, httpcore2.NetworkError, OSError, ssl.SSLError) as exc:
            raise ClientDocumentError(f"fetching {url} failed: {type(exc).__name__}: {exc}") from None
        document = _check_document(url, body)
        self._cache[url] = (time.monotonic() + self._cache_seconds, document)
        while len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return document

    async def _get(self, url: str) -> bytes:
        headers = [(b"Accept", b"application/json"), (b"User-Agent", b"kernelpool")]
        async with self._pool.stream("GET", url, headers=headers) as response:
            if response.status != 200:
                raise ClientDocumentError(f"{url} answered HTTP {response.status} (redirects are not followed)")
            length = dict((k.lower(), v) for k, v in response.headers).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self._max_bytes:
                raise ClientDocumentError(f"{url} is larger than {self._max_bytes} bytes")
            body = bytearray()
            async for chunk in response.aiter_stream():
                body += chunk
                if len(body) > self._max_bytes:
                    raise ClientDocumentError(f"{url} is larger than {self._max_bytes} bytes")
            return bytes(body)

    async def resolve(self, host: str) -> str:
        """The address a fetch from `host` would connect to (raises for private ones)."""
        return await self._backend.resolve(host)

    async def close(self) -> None:
        await self._pool.aclose()


def _check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if not is_document_url(url):
        raise ClientDocumentError(f"{url!r}: a client metadata document URL must be https with a path")
    if parts.username or parts.password or parts.fragment:
        raise ClientDocumentError(f"{url!r}: no user, password or fragment in a client metadata document URL")
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        raise ClientDocumentError(f"{url!r}: no dot segments in a client metadata document URL")


def _check_document(url: str, body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ClientDocumentError(f"{url} is not a JSON document") from None
    if not isinstance(document, dict):
        raise ClientDocumentError(f"{url} is not a JSON object")
    if document.get("client_id") != url:
        raise ClientDocumentError(f"the document's client_id is not its own URL {url}")
    if not isinstance(document.get("redirect_uris"), list) or not document["redirect_uris"]:
        raise ClientDocumentError(f"{url} names no redirect_uris")
    if "client_secret" in document or document.get("token_endpoint_auth_method", "none") != "none":
        raise ClientDocumentError(f"{url}: only public clients (token_endpoint_auth_method 'none') are accepted")
    return document
