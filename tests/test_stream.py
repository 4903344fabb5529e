"""wire/stream.py: a socket read into buffers handed out as views, on asyncio and uvloop
(a Ray actor's loop): what a view shows never changes, and nothing is lost or reordered."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from tally.wire import stream

uvloop = pytest.importorskip("uvloop")


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    if request.param == "uvloop":
        return uvloop.run
    return asyncio.run


@contextlib.asynccontextmanager
async def serving(handler: stream.Handler, size: int) -> AsyncIterator[int]:
    """A ``stream`` server on a free port (yielded) for the block's duration."""
    server = await stream.start_server(handler, "127.0.0.1", 0, size)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def test_views_keep_what_they_showed_while_later_data_fills_new_buffers(run):
    sent = os.urandom(3_000_000)

    async def main() -> None:
        got: list = []
        done = asyncio.Event()

        async def handler(reader: stream.ChunkReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read():
                got.append((data, bytes(data)))  # the view, and a copy of what it showed then
                await asyncio.sleep(0)  # (more arrives meanwhile)
            writer.write(b"bye")
            await writer.drain()
            writer.close()
            done.set()

        async with serving(handler, 256 * 1024) as port:
            reader, writer = await stream.open_connection("127.0.0.1", port, 1 << 16)
            for k in range(0, len(sent), 100_000):
                writer.write(sent[k:k + 100_000])
                await writer.drain()
            writer.write_eof()
            assert bytes(await reader.read()) == b"bye"  # answered after the client's EOF
            await done.wait()
            assert b"".join(copy for _, copy in got) == sent  # in order, nothing lost
            assert all(bytes(view) == copy for view, copy in got)  # no view was written again
            assert len(got) > 1
            writer.close()

    run(main())


def test_a_reader_that_does_not_read_stops_the_sender_until_it_does(run):
    async def main() -> None:
        readers: list[stream.ChunkReader] = []
        go = asyncio.Event()

        async def handler(reader: stream.ChunkReader, writer: asyncio.StreamWriter) -> None:
            readers.append(reader)
            await go.wait()
            total = 0
            while data := await reader.read():
                total += len(data)
            writer.write(str(total).encode())
            await writer.drain()
            writer.close()

        async with serving(handler, 64 * 1024) as port:
            client, writer = await asyncio.open_connection("127.0.0.1", port)
            chunk = b"x" * 65536
            sent = 0
            with pytest.raises(TimeoutError):  # the server's buffer and both sockets fill up
                async with asyncio.timeout(1.0):
                    while True:
                        writer.write(chunk)
                        sent += len(chunk)
                        await writer.drain()
            assert readers[0].transport is not None and not readers[0].transport.is_reading()
            go.set()
            await writer.drain()
            writer.write_eof()
            assert int(await client.read()) == sent  # all of it, once read
            writer.close()

    run(main())


def test_a_reset_connection_raises_after_what_arrived_before_it(run):
    async def main() -> None:
        got: list = []
        errors: list = []
        ended = asyncio.Event()

        async def handler(reader: stream.ChunkReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read():
                    got.append(bytes(data))
            except ConnectionError as e:
                errors.append(e)
            ended.set()

        async with serving(handler, 1 << 16) as port:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"abc")
            await asyncio.sleep(0.1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # linger 0: a reset, not an end of stream
            await asyncio.wait_for(ended.wait(), 5)
            assert b"".join(got) == b"abc"
            assert len(errors) == 1 and isinstance(errors[0], ConnectionResetError)

    run(main())


async def until(condition, timeout: float = 10) -> None:
    """Wait on the loop until ``condition()`` holds; ``timeout`` only bounds a hang."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_an_idle_reader_lets_its_buffers_go_and_reads_on_after(run, monkeypatch):
    # Long enough that a busy machine's pause between the read and the first check
    # below cannot pass for idleness; the release itself is awaited, not slept for.
    monkeypatch.setattr(stream, "IDLE_RELEASE", 0.5)

    async def main() -> None:
        readers: list[stream.ChunkReader] = []
        got: list[bytes] = []
        ended = asyncio.Event()

        async def handler(reader: stream.ChunkReader, writer: asyncio.StreamWriter) -> None:
            readers.append(reader)
            while data := await reader.read():
                got.append(bytes(data))
            ended.set()

        async with serving(handler, 1 << 16) as port:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"first")
            await writer.drain()
            await until(lambda: got == [b"first"])
            assert readers[0]._buf is not None  # (not idle long enough yet)
            await until(lambda: readers[0]._buf is None)
            assert readers[0]._spare is None
            writer.write(b"second")
            await writer.drain()
            writer.close()
            await asyncio.wait_for(ended.wait(), 10)
            assert got == [b"first", b"second"]

    run(main())
