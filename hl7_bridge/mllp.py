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
  server handles the complete blocks that came before it, sends nothing for the oversize one,
  logs a warning and **closes the connection**. The limit is checked while bytes arrive, so
  memory stays bounded by the limit, not by what the sender pushes. Closing (rather than
  silently skipping the block and keeping the connection) is chosen because MLLP R2 is strictly
  one reply per block: an unanswered block leaves the sender waiting for a reply that never
  comes, and a reply for a *later* block would be taken as the answer to the oversize one. A
  closed connection is an unambiguous, immediate signal; the sender sees an error instead of a
  timeout, and no later block is answered out of turn.
* **Idle timeout** (``idle_timeout`` seconds, default 600, ``None`` disables): the longest the
  server waits for the next bytes from a connection, including in the middle of a block (so a
  sender that stalls mid-block, or trickles bytes forever, cannot hold a connection and its
  buffer) and for a reply write to drain (a peer that stops reading cannot either). Time spent
  in the handler does not count. On expiry the connection is closed; senders reconnect, as
  MLLP R2 expects of them.
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
DEFAULT_IDLE_TIMEOUT = 600.0
_READ_CHUNK = 64 * 1024
_WHITESPACE = b"\r\n\t \x00"

Handler = Callable[[bytes], Awaitable[bytes | None]]
"""Called once per complete block with its content; returns the reply content (``None``: no reply)."""

ErrorReply = Callable[[bytes, Exception], bytes | None]
"""Called when the handler raised; returns the reply content for that block (``None``: no reply)."""


class FrameTooLargeError(ValueError):
    """A block's content exceeded the deframer's limit (see module docstring, "Oversize blocks").

    ``messages`` holds the complete blocks decoded, in order, *before* the oversize one in the
    same :meth:`Deframer.feed` call, so a caller can still answer them.
    """

    def __init__(self, limit: int, size: int, messages: list[bytes]) -> None:
        super().__init__(f"MLLP block exceeds {limit} bytes (at least {size} received)")
        self.limit = limit
        self.size = size
        self.messages = messages


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
        # Many senders put a line end after each block; that is noise, not a faulty sender.
        if not chunk.strip(_WHITESPACE):
            self.discarded_whitespace += len(chunk)

    def _check_size(self, decoded: list[bytes]) -> None:
        size = len(self._buf)
        if size > self.max_size:
            self.reset()
            raise FrameTooLargeError(self.max_size, size, decoded)


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
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        ssl: ssl_module.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        close_grace: float = 5.0,
    ) -> None:
        self.handler = handler
        self.host = host
        self._requested_port = port
        self.on_error = on_error
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
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
        )
        conn = _Connection(info, task)
        self._connections.add(conn)
        _current.set(info)  # this task's own context: visible to the handler, to no other connection
        log.info("MLLP connection %d from %s%s", info.id, info.peername, " (TLS)" if info.tls else "")
        try:
            if self._closing:
                return
            await self._read_loop(conn, reader, writer)
        except asyncio.CancelledError:
            log.info("MLLP connection %d cancelled (server closing)", info.id)
        except OSError as exc:  # reset, broken pipe, TLS errors: this connection only
            log.info("MLLP connection %d: %s", info.id, exc)
        finally:
            self._connections.discard(conn)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)
            log.info("MLLP connection %d closed", info.id)

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
            if not data:
                if deframer.pending:
                    log.warning("MLLP connection %d closed by peer mid-block, %d bytes lost", cid, deframer.pending)
                return
            discarded_before = deframer.discarded
            whitespace_before = deframer.discarded_whitespace
            oversize: FrameTooLargeError | None = None
            try:
                messages = deframer.feed(data)
            except FrameTooLargeError as exc:
                messages, oversize = exc.messages, exc
            dropped = deframer.discarded - discarded_before
            noise = deframer.discarded_whitespace - whitespace_before
            if dropped and oversize is None:
                # Real garbage says something is wrong with the sender; line ends between blocks do not.
                level = logging.WARNING if dropped > noise else logging.DEBUG
                log.log(level, "MLLP connection %d: discarded %d bytes outside MLLP blocks", cid, dropped)
            for message in messages:
                if not await self._answer(conn, message, writer):
                    return
            if oversize is not None:
                # See module docstring "Oversize blocks": no reply, close the connection.
                log.warning("MLLP connection %d: %s; closing the connection", cid, oversize)
                return

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
