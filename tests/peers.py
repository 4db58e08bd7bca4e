"""Peers from other libraries, for tests: an MLLP receiver (python-hl7's asyncio server) and an
HTTP endpoint (``http.server``), each on a free 127.0.0.1 port in a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hl7
import hl7.mllp
import orjson


class Receiver:
    """python-hl7's asyncio MLLP server on its own thread: answers AA, AE, nothing, or a malformed ACK."""

    def __init__(self, port: int = 0) -> None:
        self.port, self.mode = port, "AA"
        self.received: list[hl7.Message] = []  # every message that arrived
        self.accepted: list[hl7.Message] = []  # those answered AA
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.Server | None = None
        self.writers: list[hl7.mllp.HL7StreamWriter] = []

    def start(self) -> Receiver:
        async def start() -> asyncio.Server:
            return await hl7.mllp.start_hl7_server(self._client, "127.0.0.1", self.port, encoding="utf-8")

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def stop(server: asyncio.Server) -> None:
            server.close()
            for writer in self.writers:  # Python 3.11's Server has no close_clients()
                writer.close()
            await server.wait_closed()

        if self.server is not None:
            asyncio.run_coroutine_threadsafe(stop(self.server), self.loop).result(5)
            self.server = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _client(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                message = await reader.readmessage()
                self.received.append(message)
                if self.mode == "silent":
                    continue
                if self.mode == "malformed":
                    ack = message.create_ack("AA", message_id="ACK1")
                    ack.segment("MSA")[2] = "SOMEONE-ELSES-ID"
                else:
                    ack = message.create_ack(self.mode, message_id="ACK1")
                if self.mode == "AA":
                    self.accepted.append(message)
                writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def control_ids(self, messages: list[hl7.Message] | None = None) -> list[str]:
        return [str(m.segment("MSH")[10]) for m in (self.accepted if messages is None else messages)]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def resource(self) -> dict:
        return orjson.loads(self.body)


class HttpReceiver:
    """A rest-hook endpoint: records each request and answers ``status`` with ``headers``."""

    def __init__(self, port: int = 0) -> None:
        self.port, self.status = port, 200
        self.headers: dict[str, str] = {}
        self.requests: list[Received] = []
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> HttpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append(Received(self.command, self.path, headers, body))
                self.send_response(receiver.status)
                for name, value in receiver.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = _record

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        # stop() waits for the loop to see its flag: it looks every 0.05 s rather than every 0.5 s
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"
