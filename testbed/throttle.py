"""A slow link for tests and benchmarks: a TCP proxy that limits bandwidth and adds latency, per direction, with
no root and no network namespaces. Give each device its own proxy to give each its own link.

    with ThrottledLink("127.0.0.1", broker.port, mbps=10, latency_ms=20) as link:
        ...  # clients connect to 127.0.0.1:link.port

Each direction is a reader that timestamps what arrives and a writer that sends it no earlier than its arrival
plus the latency and no faster than the bandwidth (a serialisation clock). A bounded queue between them makes
TCP push back on the sender, as a real bottleneck does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

READ_BYTES = 16 * 1024
QUEUE_CHUNKS = 64


@dataclass
class LinkStats:
    """Bytes forwarded so far, per direction."""

    up_bytes: int = 0  # client -> server
    down_bytes: int = 0


@dataclass
class ThrottledLink:
    """A proxy on 127.0.0.1:`port` (chosen when started) to `upstream_host`:`upstream_port`."""

    upstream_host: str
    upstream_port: int
    mbps: float | None = None  # per direction; None: unlimited
    latency_ms: float = 0.0  # one way
    stats: LinkStats = field(default_factory=LinkStats)
    port: int = 0

    def __post_init__(self) -> None:
        if self.mbps is not None and self.mbps <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.mbps} Mbps")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> ThrottledLink:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"throttle-{self.upstream_port}", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> ThrottledLink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pipe(client_reader, server_writer, "up_bytes"),
            self._pipe(server_reader, client_writer, "down_bytes"),
            return_exceptions=True,
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def receive() -> None:
            while data := await reader.read(READ_BYTES):
                await queue.put((time.monotonic(), data))
            await queue.put((time.monotonic(), b""))

        async def send() -> None:
            free_at = 0.0
            while True:
                arrived, data = await queue.get()
                due = max(arrived + self.latency_ms / 1000, free_at)
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
                setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
                free_at = due + (len(data) * 8 / (self.mbps * 1e6) if self.mbps else 0)  # late sends catch up

        try:
            await asyncio.gather(receive(), send())
        finally:
            writer.close()
