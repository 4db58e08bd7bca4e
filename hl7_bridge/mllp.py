"""MLLP transport for HL7 v2: framing codec, asyncio server and a one-shot client.

Spec: *HL7 Version 3 Standard: Transport Specification - MLLP, Release 2* ("MLLP R2") and
HL7 v2.5.1 Appendix C, "Minimal Lower Layer Protocol". A message travels as one block::

    <SB> message bytes <EB><CR>      SB = 0x0B, EB = 0x1C, CR = 0x0D

This module moves bytes only. It never parses HL7 and never picks a character encoding: the
HL7 layer (ACKs, message store, mapping) plugs in through the ``handler`` and ``on_error``
callables of :class:`MllpServer`.

Choices, and why:

* **Bytes outside blocks** (before a start block, or between a block's end and the next start
  block) are discarded and logged. MLLP R2 "Block Format" defines no content there; real
  senders emit stray CR/LF or keep-alive bytes, and refusing the connection for them would
  make the sender retry forever.
  Whitespace alone (a line end after each block, common in practice) is logged at DEBUG only.
* **A start block inside a block** abandons the unfinished block and starts a new one. The
  payload may not contain SB/EB (MLLP R2 "Block Format"), so a second SB means the sender gave
  up on a truncated block and started again; the abandoned bytes are logged, never handled.
* **An EB not followed by CR** is kept as content. Only ``EB CR`` ends a block, exactly as the
  spec writes it; it is not ours to guess a looser terminator.
* **Oversize blocks** (more than ``max_message_size`` bytes of content, default 10 MiB): the
  server handles the complete blocks that came before it, and the limit is checked while bytes
  arrive, so memory stays bounded by the limit (plus one read), not by what the sender pushes.
  With ``on_oversize`` (the HL7 layer answers an AE from the block's MSH) the block is answered
  at once, the rest of it is dropped without a log line per read, and the connection goes on:
  one reply per block, in order. Without it (or when it returns ``None``) nothing is sent, a
  warning is logged and the connection is **closed**: MLLP R2 is strictly one reply per block,
  and a reply for a *later* block would be taken as the answer to the oversize one; a closed
  connection is an unambiguous, immediate signal.
* **Idle timeout** (``idle_timeout`` seconds, default 60, ``None`` disables): the longest the
  server waits for the next bytes from a connection, including in the middle of a block (so a
  sender that stalls mid-block, or trickles bytes forever, cannot hold a connection and its
  buffer) and for a reply write to drain (a peer that stops reading cannot either). Time spent
  in the handler does not count. On expiry the connection is closed; senders reconnect, as
  MLLP R2 expects of them.
* **Connection limits** (``max_connections_per_address``, default 64, and ``max_connections``,
  default 256): a connection past either closes the one idle the longest (of the same address
  first), so idle sockets cannot lock out a sender that sends; only when every connection is
  busy in the handler is the new one closed. The file descriptors MLLP holds stay bounded.
* **Out of file descriptors**: asyncio pauses accepting for a second and reports each failure;
  :func:`quiet_accept_errors` logs that once a minute with a count, not as a flood of tracebacks.
* **Ordering**: one connection's blocks are handled strictly one after another; the reply to
  block *n* is written before block *n+1* reaches the handler (MLLP R2 content exchange is
  request/reply per block). Different connections run concurrently, each in its own task.
* **Handler errors**: an exception from the handler (or a reply that cannot be framed) is
  logged with its traceback and ``on_error(message, exc)`` is asked for the reply (the HL7
  layer will answer with an AE/AR ACK, as the architecture requires errors on the wire to be
  protocol values). ``on_error`` returning ``None`` (the default) sends no reply. Either way
  the connection stays open and the next block is handled; one bad message must not stop the
  queue behind it.
* **No MLLP R2 commit acknowledgement.** MLLP R2 defines an optional transport-level commit
  ACK/NAK block (0x06 / 0x15). HL7 v2 senders expect the application ACK as the reply block
  (v2.5.1 Appendix C MLLP has no commit ACK), so the server replies only with what the handler
  returns; a handler implementing MLLP R2 could return ``b"\\x06"`` itself.
* **TLS**: pass an :class:`ssl.SSLContext` (server certificate loaded; set ``verify_mode`` to
  ``CERT_REQUIRED`` plus a CA to require client certificates). MLLP over TLS is plain MLLP
  inside the TLS stream.
* **TCP_NODELAY** is set on every accepted and client socket: blocks and ACKs are small and
  latency-bound request/reply, exactly the case where Nagle's algorithm only adds delay.

The handler may read :func:`current_connection` to learn the peer (address, TLS client
certificate) without the ``bytes -> bytes`` signature having to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import socket
import ssl as ssl_module
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = [
    "CARRIAGE_RETURN",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "END_BLOCK",
    "START_BLOCK",
    "ConnectionInfo",
    "Deframer",
    "ErrorReply",
    "FrameTooLargeError",
    "Handler",
    "MllpConnectionClosedError",
    "MllpServer",
    "current_connection",
    "frame",
    "send",
]

log = logging.getLogger(__name__)

# MLLP R2 "Block Format" / v2.5.1 Appendix C "Minimal Lower Layer Protocol": <SB> data <EB><CR>.
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
_SB = START_BLOCK[0]
_EB = END_BLOCK[0]
_CR = CARRIAGE_RETURN[0]

DEFAULT_MAX_MESSAGE_SIZE = 10 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 64
#: How much of an oversize block is kept for ``on_oversize`` (enough for its MSH).
OVERSIZE_HEAD = 64 * 1024
#: Seconds between two logs of the event loop's "accept() out of system resource" (``quiet_accept_errors``).
ACCEPT_ERROR_LOG_INTERVAL = 60.0
_READ_CHUNK = 64 * 1024
_WHITESPACE = b"\r\n\t \x00"

Handler = Callable[[bytes], Awaitable[bytes | None]]
"""Called once per complete block with its content; returns the reply content (``None``: no reply)."""

ErrorReply = Callable[[bytes, Exception], bytes | None]
"""Called when the handler raised; returns the reply content for that block (``None``: no reply)."""

OversizeReply = Callable[[bytes, int], bytes | None]
"""Called with the head of an oversize block and the limit; returns its reply (``None``: close instead)."""


class FrameTooLargeError(ValueError):
    """A block's content exceeded the deframer's limit (see module docstring, "Oversize blocks").

    ``messages`` holds the complete blocks decoded, in order, *before* the oversize one in the
    same :meth:`Deframer.feed` call, so a caller can still answer them.
    """

    def __init__(self, limit: int, size: int, messages: list[bytes], head: bytes = b"") -> None:
        super().__init__(f"MLLP block exceeds {limit} bytes (at least {size} received)")
        self.limit = limit
        self.size = size
        self.messages = messages
        #: The first ``OVERSIZE_HEAD`` bytes of the oversize block (its MSH, to answer it by).
        self.head = head


class MllpConnectionClosedError(ConnectionError):
    """The peer closed the connection before a complete reply block arrived."""


@contextlib.contextmanager
def serving_in_thread(handler: Handler, host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """An MllpServer in an event loop of its own thread, for synchronous callers; yields its port."""
    with running_in_thread(MllpServer(handler, host, port)) as bound:
        yield bound


@contextlib.contextmanager
def running_in_thread(server: MllpServer) -> Iterator[int]:
    """``server`` started in an event loop of its own thread; yields its port, closes it on exit."""
    loop = asyncio.new_event_loop()
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, name="mllp-server", daemon=True)
    thread.start()
    try:
        yield server.port
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class AcceptErrorLog:
    """An event loop exception handler that logs "accept() out of system resource" once per interval.

    When the process runs out of file descriptors, asyncio stops accepting on that listener for a
    second and reports each failed accept with a traceback: under a socket flood, many per
    second for as long as it lasts. This keeps the first report of each ``interval`` (with the
    count of those left out); any other context goes to the handler that was there before.
    """

    MESSAGE = "socket.accept() out of system resource"

    def __init__(
        self,
        interval: float = ACCEPT_ERROR_LOG_INTERVAL,
        previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.previous = previous
        self.clock = clock
        self.suppressed = 0
        self._last: float | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != self.MESSAGE:
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return
        log.error(
            "%s: %s (%d more since the last report); accepting again after a pause",
            self.MESSAGE, context.get("exception"), self.suppressed,
        )  # fmt: skip
        self._last, self.suppressed = now, 0


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, interval: float = ACCEPT_ERROR_LOG_INTERVAL) -> None:
    """Install :class:`AcceptErrorLog` on ``loop`` (every listener of the process shares its loop)."""
    loop.set_exception_handler(AcceptErrorLog(interval, loop.get_exception_handler()))


def frame(message: bytes) -> bytes:
    """Wrap ``message`` in one MLLP block: ``SB message EB CR`` (MLLP R2 "Block Format").

    Raises :class:`ValueError` if ``message`` contains SB (0x0B) or EB (0x1C): MLLP R2 does not
    allow them in the payload, and a receiver would split or restart the block on them, so
    sending such bytes would corrupt the message silently on the other side.
    """
    if _SB in message or _EB in message:
        raise ValueError("MLLP payload must not contain 0x0B (start block) or 0x1C (end block)")
    return START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN


class Deframer:
    """Incremental MLLP block decoder (MLLP R2 "Block Format"), used by both server and client.

    Feed it whatever the socket delivered; it returns the contents of the blocks completed so
    far and keeps any partial block for the next call, so blocks split across reads and several
    blocks in one read both work. Bytes outside blocks and abandoned partial blocks are dropped
    and counted in :attr:`discarded`.

    When a block's content grows past ``max_size``, :meth:`feed` raises
    :class:`FrameTooLargeError` as soon as the limit is crossed (memory stays bounded) and the
    deframer resets: the rest of that chunk and the rest of the oversize block are treated as
    bytes outside blocks until the next start block.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        self.discarded = 0
        """Bytes dropped so far: outside blocks, or in partial blocks abandoned for a new SB."""
        self.discarded_whitespace = 0
        """The part of :attr:`discarded` that was only CR/LF/space/tab/NUL between blocks."""
        self.discarded_oversize = 0
        """The part of :attr:`discarded` that was the rest of an oversize block (already reported)."""
        self._oversize_tail = False  # dropping the rest of an oversize block, until the next SB
        self._buf = bytearray()
        self._in_block = False
        # An EB was the last byte of the previous chunk; only the next byte says whether it ends
        # the block (EB CR) or is content.
        self._pending_eb = False

    @property
    def pending(self) -> int:
        """Bytes of an unfinished block held for the next :meth:`feed` (0 between blocks)."""
        return len(self._buf) + self._pending_eb if self._in_block else 0

    def reset(self) -> None:
        """Forget any partial block (its bytes count as discarded)."""
        self.discarded += self.pending + self._in_block  # the SB of an abandoned block too
        self._buf.clear()
        self._in_block = False
        self._pending_eb = False

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the content of every block it completes, in order."""
        out: list[bytes] = []
        i = 0
        n = len(data)
        while i < n:
            if not self._in_block:
                start = data.find(START_BLOCK, i)
                if start < 0:
                    self._discard_outside(data[i:])
                    break
                self._discard_outside(data[i:start])
                self._oversize_tail = False
                self._in_block = True
                i = start + 1
                continue
            if self._pending_eb:
                self._pending_eb = False
                if data[i] == _CR:
                    out.append(bytes(self._buf))
                    self._buf.clear()
                    self._in_block = False
                    i += 1
                    continue
                # A lone EB is content; fall through and keep scanning from this byte.
                self._buf.append(_EB)
                self._check_size(out)
            end = data.find(END_BLOCK, i)
            restart = data.find(START_BLOCK, i, end if end >= 0 else n)
            if restart >= 0:
                # SB inside a block: the sender abandoned a truncated block and started anew.
                self._buf += data[i:restart]
                self.discarded += len(self._buf) + 1  # the abandoned content and its SB
                log.debug("MLLP: start block inside a block, %d bytes abandoned", len(self._buf))
                self._buf.clear()
                i = restart + 1
                continue
            if end < 0:
                self._buf += data[i:]
                self._check_size(out)
                break
            self._buf += data[i:end]
            self._check_size(out)
            if end + 1 == n:
                self._pending_eb = True
                break
            if data[end + 1] == _CR:
                out.append(bytes(self._buf))
                self._buf.clear()
                self._in_block = False
                i = end + 2
            else:
                self._buf.append(_EB)
                self._check_size(out)
                i = end + 1
        return out

    def _discard_outside(self, chunk: bytes) -> None:
        self.discarded += len(chunk)
        if self._oversize_tail:
            self.discarded_oversize += len(chunk)
            return
        # Many senders put a line end after each block; that is noise, not a faulty sender.
        if not chunk.strip(_WHITESPACE):
            self.discarded_whitespace += len(chunk)

    def _check_size(self, decoded: list[bytes]) -> None:
        size = len(self._buf)
        if size > self.max_size:
            head = bytes(self._buf[:OVERSIZE_HEAD])
            self.reset()
            self._oversize_tail = True
            raise FrameTooLargeError(self.max_size, size, decoded, head)


@dataclass(frozen=True)
class ConnectionInfo:
    """What the server knows about one accepted connection."""

    id: int
    peername: Any
    sockname: Any
    tls: bool
    peer_certificate: dict[str, Any] | None = None
    """The verified TLS client certificate (``SSLSocket.getpeercert()`` form), if one was sent."""
    tcp_nodelay: bool = False
    peer_certificate_der: bytes | None = None
    """The same certificate, DER-encoded (to read its subject exactly)."""


_current: contextvars.ContextVar[ConnectionInfo] = contextvars.ContextVar("mllp_connection")


def current_connection() -> ConnectionInfo | None:
    """The connection whose block the running handler is processing (``None`` outside one)."""
    return _current.get(None)


def _set_nodelay(transport_socket: Any) -> bool:
    # asyncio usually sets TCP_NODELAY itself; set it explicitly so this never depends on the
    # event loop implementation, and report what is actually in effect.
    if transport_socket is None or transport_socket.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        transport_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return bool(transport_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except OSError:
        return False


@dataclass(eq=False)
class _Connection:
    info: ConnectionInfo
    task: asyncio.Task[None]
    busy: bool = False
    #: ``loop.time()`` of its last bytes (or its accept): the least recent idle one is evicted first.
    last_active: float = 0.0
    evicted: bool = False

    @property
    def address(self) -> Any:
        peer = self.info.peername
        return peer[0] if isinstance(peer, tuple) else peer


class MllpServer:
    """asyncio MLLP listener (MLLP R2 content exchange: one reply block per received block).

    ``handler(message) -> reply`` is awaited for each complete block; the reply is sent framed.
    See the module docstring for oversize, idle timeout, error and ordering behaviour.

    Use ``async with MllpServer(...) as server`` or ``await server.start()`` /
    ``await server.close()``. With ``port=0`` the OS picks a free port, readable as
    :attr:`port` after start.

    Parameters: ``handler`` (awaited per block; ``None`` result = no reply), ``host``/``port``,
    ``on_error(message, exc)`` (reply after a handler exception; default none), ``max_message_size``
    (block content limit in bytes), ``idle_timeout`` (seconds, ``None`` = never), ``ssl`` (server
    :class:`ssl.SSLContext`; client certificates are required if its ``verify_mode`` says so),
    ``ssl_handshake_timeout`` (``None`` = asyncio's default), ``close_grace`` (seconds
    :meth:`close` lets a running handler finish).
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 2575,
        *,
        on_error: ErrorReply | None = None,
        on_oversize: OversizeReply | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        ssl: ssl_module.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        close_grace: float = 5.0,
    ) -> None:
        self.handler = handler
        self.host = host
        self._requested_port = port
        self.on_error = on_error
        self.on_oversize = on_oversize
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.ssl = ssl
        self.ssl_handshake_timeout = ssl_handshake_timeout
        self.close_grace = close_grace
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._closing = False
        self._ids = itertools.count(1)

    @property
    def port(self) -> int:
        """The bound port (the OS-chosen one when constructed with ``port=0``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("MllpServer is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> list[ConnectionInfo]:
        """The connections open right now."""
        return [c.info for c in self._connections]

    async def start(self) -> None:
        """Bind and start accepting connections."""
        if self._server is not None:
            raise RuntimeError("MllpServer already started")
        self._closing = False
        self._server = await asyncio.start_server(
            self._serve_connection,
            self.host,
            self._requested_port,
            ssl=self.ssl,
            ssl_handshake_timeout=self.ssl_handshake_timeout if self.ssl else None,
            limit=_READ_CHUNK,
        )
        log.info("MLLP listening on %s:%d%s", self.host, self.port, " (TLS)" if self.ssl else "")

    async def close(self) -> None:
        """Stop accepting, then close every connection.

        Idle connections close at once. A connection whose handler is running gets up to
        ``close_grace`` seconds to finish that block and send its reply (so a message the HL7
        layer has committed is still acknowledged); after that it is cancelled.
        """
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        for conn in list(self._connections):
            if not conn.busy:
                conn.task.cancel()
        pending = [c.task for c in self._connections]
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.close_grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
        await self._server.wait_closed()
        self._server = None
        log.info("MLLP listener closed")

    async def __aenter__(self) -> MllpServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        ssl_object = writer.get_extra_info("ssl_object")
        info = ConnectionInfo(
            id=next(self._ids),
            peername=writer.get_extra_info("peername"),
            sockname=writer.get_extra_info("sockname"),
            tls=ssl_object is not None,
            peer_certificate=ssl_object.getpeercert() if ssl_object is not None else None,
            tcp_nodelay=_set_nodelay(writer.get_extra_info("socket")),
            peer_certificate_der=ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None,
        )
        conn = _Connection(info, task, last_active=asyncio.get_running_loop().time())
        if not self._make_room(conn):
            log.warning("MLLP connection %d from %s refused: every connection is busy", info.id, conn.address)
            writer.close()
            return
        self._connections.add(conn)
        _current.set(info)  # this task's own context: visible to the handler, to no other connection
        log.info("MLLP connection %d from %s%s", info.id, info.peername, " (TLS)" if info.tls else "")
        try:
            if self._closing:
                return
            await self._read_loop(conn, reader, writer)
        except asyncio.CancelledError:
            if conn.evicted:
                log.info("MLLP connection %d closed to make room: idle the longest", info.id)
            else:
                log.info("MLLP connection %d cancelled (server closing)", info.id)
        except OSError as exc:  # reset, broken pipe, TLS errors: this connection only
            log.info("MLLP connection %d: %s", info.id, exc)
        finally:
            self._connections.discard(conn)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)
            log.info("MLLP connection %d closed", info.id)

    def _make_room(self, new: _Connection) -> bool:
        """Keep within ``max_connections_per_address`` and ``max_connections`` by closing the connection
        idle the longest (of the new one's address first); False when every one is busy.

        Evicting rather than refusing: a flood of idle sockets cannot lock out a sender that sends,
        and MLLP senders reconnect when their connection closes (MLLP R2).
        """
        same = [c for c in self._connections if c.address == new.address]
        for pool, limit in ((same, self.max_connections_per_address), (self._connections, self.max_connections)):
            if len(pool) >= limit:
                idle = [c for c in pool if not c.busy and not c.evicted]
                if not idle:
                    return False
                oldest = min(idle, key=lambda c: c.last_active)
                oldest.evicted = True
                oldest.task.cancel()
                self._connections.discard(oldest)
        return True

    async def _read_loop(self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid = conn.info.id
        deframer = Deframer(self.max_message_size)
        while not self._closing:
            try:
                data = await asyncio.wait_for(reader.read(_READ_CHUNK), self.idle_timeout)
            except TimeoutError:
                log.info(
                    "MLLP connection %d idle for %ss, closing (%d bytes of partial block lost)",
                    cid,
                    self.idle_timeout,
                    deframer.pending,
                )
                return
            conn.last_active = asyncio.get_running_loop().time()
            if not data:
                if deframer.pending:  # unacknowledged, so the sender resends it; INFO like idle closes: both flood
                    log.info("MLLP connection %d closed by peer mid-block, %d bytes lost", cid, deframer.pending)
                return
            discarded_before = deframer.discarded
            whitespace_before = deframer.discarded_whitespace + deframer.discarded_oversize
            oversize: FrameTooLargeError | None = None
            try:
                messages = deframer.feed(data)
            except FrameTooLargeError as exc:
                messages, oversize = exc.messages, exc
            dropped = deframer.discarded - discarded_before
            noise = deframer.discarded_whitespace + deframer.discarded_oversize - whitespace_before
            if dropped and oversize is None:
                # Real garbage says something is wrong with the sender; line ends between blocks do not.
                level = logging.WARNING if dropped > noise else logging.DEBUG
                log.log(level, "MLLP connection %d: discarded %d bytes outside MLLP blocks", cid, dropped)
            for message in messages:
                if not await self._answer(conn, message, writer):
                    return
            if oversize is not None and not await self._refuse_oversize(conn, oversize, writer):
                return

    async def _refuse_oversize(
        self, conn: _Connection, oversize: FrameTooLargeError, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer an oversize block with ``on_oversize``'s reply and go on; False (close) without one."""
        reply = None
        if self.on_oversize is not None:
            try:
                reply = self.on_oversize(oversize.head, oversize.limit)
                reply = None if reply is None else frame(reply)
            except Exception:
                log.exception("MLLP connection %d: on_oversize failed", conn.info.id)
                reply = None
        if reply is None:
            # See module docstring "Oversize blocks": no reply, close the connection.
            log.warning("MLLP connection %d: %s; closing the connection", conn.info.id, oversize)
            return False
        log.warning("MLLP connection %d: %s; refused, the rest of the block is dropped", conn.info.id, oversize)
        writer.write(reply)
        try:
            await asyncio.wait_for(writer.drain(), self.idle_timeout)
        except TimeoutError:
            return False
        return not self._closing

    async def _answer(self, conn: _Connection, message: bytes, writer: asyncio.StreamWriter) -> bool:
        """Handle one block and write its reply; False when the connection must end."""
        conn.busy = True
        try:
            reply = await self._reply_for(conn.info.id, message)
            if reply is not None:
                writer.write(reply)
                # Bounded like a read: a peer that never reads its ACKs must not hold us forever.
                await asyncio.wait_for(writer.drain(), self.idle_timeout)
        except TimeoutError:
            log.info("MLLP connection %d: reply not drained in %ss, closing", conn.info.id, self.idle_timeout)
            return False
        finally:
            conn.busy = False
        # Closing: the reply to the block in hand has gone out; take no further block.
        return not self._closing

    async def _reply_for(self, cid: int, message: bytes) -> bytes | None:
        """The framed reply for ``message``, or None; handler failures go to ``on_error``."""
        try:
            reply = await self.handler(message)
            return None if reply is None else frame(reply)
        except Exception as exc:
            log.exception("MLLP connection %d: handler failed on a %d-byte message", cid, len(message))
            if self.on_error is None:
                return None
            try:
                error_reply = self.on_error(message, exc)
                return None if error_reply is None else frame(error_reply)
            except Exception:
                log.exception("MLLP connection %d: on_error failed too; no reply sent", cid)
                return None


async def send(
    host: str,
    port: int,
    message: bytes,
    timeout: float = 30.0,
    *,
    ssl: ssl_module.SSLContext | None = None,
    server_hostname: str | None = None,
    max_reply_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> bytes:
    """Send ``message`` as one MLLP block and return the content of the first reply block.

    One connection per call (MLLP R2 content exchange: one block, one reply). ``timeout`` bounds
    the whole exchange (connect, send, reply) and raises :class:`TimeoutError`; a peer that
    closes before replying raises :class:`MllpConnectionClosedError`.
    """
    block = frame(message)  # before connecting: an unframeable payload never reaches the wire
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl, server_hostname=(server_hostname or host) if ssl else None, limit=_READ_CHUNK
        )
        try:
            _set_nodelay(writer.get_extra_info("socket"))
            writer.write(block)
            await writer.drain()
            deframer = Deframer(max_reply_size)
            while True:
                data = await reader.read(_READ_CHUNK)
                if not data:
                    raise MllpConnectionClosedError("connection closed before a reply block arrived")
                replies = deframer.feed(data)
                if replies:
                    return replies[0]
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
