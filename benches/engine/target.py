#!/usr/bin/env python3
"""A tiny asyncio HTTP/1.1 target for the engine benchmarks (stdlib only).

GET /ok           200 immediately
GET /delay/<ms>   200 after <ms> milliseconds (holds thousands of idle connections cheaply)
GET /stall        200, except during the last second of every 5 s window, when requests are
                  held until the window ends (a target that stalls 1 s every 5 s)
"""
import asyncio
import sys
import time

START = time.monotonic()
BODY = b"ok"


async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            path = parts[1] if len(parts) > 1 else "/"
            if path.startswith("/delay/"):
                await asyncio.sleep(int(path[len("/delay/"):]) / 1000.0)
            elif path == "/stall":
                phase = (time.monotonic() - START) % 5.0
                if phase >= 4.0:
                    await asyncio.sleep(5.0 - phase)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\n" + BODY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=8192)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
