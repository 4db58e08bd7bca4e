"""Where the server may send HTTP requests of a client's choosing: Subscription endpoints.

A defence against server-side request forgery (OWASP, "Server-Side Request Forgery Prevention
Cheat Sheet": allow-list the destinations, refuse internal addresses, do not follow redirects):

- the URL must fall under one of the configured prefixes (``subscriptions.allowed_endpoints``):
  same scheme, host and port, and the prefix's path or one under it at a ``/``;
- every address its host resolves to must be an ordinary remote one: not loopback, link-local
  (cloud metadata at 169.254.169.254), unspecified (0.0.0.0/8, ``::``), multicast, nor an
  address of one of this host's interfaces (where its own listeners, database and PACS may
  be), unless the matching prefix names that address itself (an IP literal, or ``localhost``
  for loopback).

``check`` runs when a Subscription is written (its prefix and an IP-literal host; a host name
is not looked up there, on the event loop) and again, resolving names, before every request on
the notifier's thread; the request goes to the address checked (``pinned``: the URL's host
replaced by it, ``Host`` and TLS SNI kept), so a DNS answer that changes in between cannot
point it elsewhere.
"""

import ipaddress
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``(host, port)`` → the addresses a connection to it may reach.
Resolver = Callable[[str, int], Sequence[Address]]
PORTS = {"http": 80, "https": 443}
RESOLVE_SECONDS = 2.0
_lookups = ThreadPoolExecutor(4, thread_name_prefix="egress-resolver")  # a lookup cannot be cancelled


class Refused(ValueError):
    """The URL is not one the server may call; the message names the rule."""


def resolve(host: str, port: int) -> list[Address]:
    """The addresses of ``host``: an IP literal is itself, a name is asked of the system resolver
    for at most ``RESOLVE_SECONDS`` (a delivery waits no longer for a resolver that hangs)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = _lookups.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(RESOLVE_SECONDS)
    except TimeoutError:
        raise Refused(f"its host {host!r} did not resolve within {RESOLVE_SECONDS:g} s") from None
    except (OSError, UnicodeError) as exc:
        raise Refused(f"its host {host!r} does not resolve") from exc
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos))


def parse(url: str) -> httpx.URL:
    """An absolute http(s) URL without credentials or dot segments; Refused otherwise."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise Refused(f"{url!r} is not a URL") from exc
    if parsed.scheme not in PORTS or not parsed.host:
        raise Refused(f"{url!r} is not an absolute http(s) URL")
    if parsed.userinfo:
        raise Refused("a URL may not carry credentials (user:password@)")
    if {".", ".."} & set(parsed.path.split("/")):  # encoded ones (%2e%2e) a receiver may still resolve
        raise Refused("a URL's path may not have . or .. segments")
    return parsed


@dataclass(frozen=True)
class Prefix:
    """An allowed URL prefix: scheme, host and port exactly, the path at a segment boundary."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, text: str) -> "Prefix":
        url = parse(text)
        if url.query or url.fragment:
            raise Refused(f"{text!r}: a prefix has no query or fragment")
        return cls(url.scheme, url.host, url.port or PORTS[url.scheme], url.path)

    def covers(self, url: httpx.URL) -> bool:
        if (url.scheme, url.host, url.port or PORTS[url.scheme]) != (self.scheme, self.host, self.port):
            return False
        base = self.path.rstrip("/")  # ``/notify/`` allows ``/notify`` too
        return url.path.rstrip("/") == base or url.path.startswith(base + "/")

    def names(self, address: Address) -> bool:
        """Whether this prefix names ``address`` itself, so allows it whatever it is."""
        if self.host == "localhost":
            return address.is_loopback
        try:
            return ipaddress.ip_address(self.host) == address
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


@dataclass(frozen=True)
class Egress:
    """The allowed prefixes (none: every URL is refused) and how host names are resolved."""

    allowed: tuple[Prefix, ...] = ()
    resolver: Resolver = resolve

    def check(self, url: str, *, resolve_names: bool = True) -> Address | None:
        """The address a request to ``url`` is to connect to; Refused naming the rule it breaks.

        Without ``resolve_names`` a host name is not looked up (None): a write checks its endpoint
        where other requests wait, so only the delivery, on a worker thread, asks the resolver."""
        parsed = parse(url)
        prefix = next((p for p in self.allowed if p.covers(parsed)), None)
        if prefix is None:
            raise Refused(f"{url!r} is under none of subscriptions.allowed_endpoints")
        if not resolve_names and not _literal(parsed.host):
            return None
        port = parsed.port or PORTS[parsed.scheme]
        addresses = self.resolver(parsed.host, port)
        if not addresses:
            raise Refused(f"its host {parsed.host!r} does not resolve")
        for address in addresses:
            kind = internal(address)
            if kind and not prefix.names(address):
                raise Refused(
                    f"{url!r} reaches {kind} address, which subscriptions.allowed_endpoints does not name itself"
                )
        return addresses[0]

    def pinned(self, url: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
        """``url`` checked, with its host replaced by the checked address: the URL, the ``Host``
        header and the request extensions (TLS SNI and certificate check still on the name)."""
        address = self.check(url)
        assert address is not None  # names are resolved here
        parsed = httpx.URL(url)
        extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
        return parsed.copy_with(host=str(address)), {"Host": parsed.netloc.decode("ascii")}, extensions


#: Allows no URL at all: what the server calls when nothing is configured.
NOWHERE = Egress()


def internal(address: Address) -> str | None:
    """What kind of address of this host or its link ``address`` is, or None for an ordinary one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "a loopback"
    if address.is_link_local:
        return "a link-local"
    if address.is_unspecified or (address.version == 4 and address.packed[0] == 0):  # Linux routes 0/8 here
        return "an unspecified"
    if address.is_multicast:
        return "a multicast"
    if _local(address):
        return "this host's own"
    return None


def _local(address: Address) -> bool:
    """Whether ``address`` is one of this host's: only those can be bound to."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def _literal(host: str) -> bool:
    """Whether ``host`` is an IP address, or the name every system resolves to loopback (RFC 6761 §6.3)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        name = host.lower().rstrip(".")
        return name == "localhost" or name.endswith(".localhost")
    return True
