"""A TCP proxy that adds round-trip delay, nothing else: the benchmark's stand-in for ``tc netem``.

    python bench/delay_proxy.py --delay-ms 20 MAP      (MAP: one "LISTEN_IP PORT TARGET_IP PORT" a line)

Why a process and not the kernel: this machine's kernel has no sch_netem (``tc qdisc add dev lo root
netem delay 10ms`` says "Specified qdisc kind is unknown", and there is no modprobe), so
bench/fleet_scale.py points its latency rows' inventory at this proxy instead of at the lab hosts.

Each accepted connection is forwarded to its target with every chunk held delay/2 in each direction, in
order, so each request/answer exchange costs one extra round trip of *delay*. The TCP handshake's round
trip is played too: the upstream connection opens 1.5 x delay after the accept (when a server behind a
delayed link would accept), and what the client sent before its connect could have returned (one delay) is
treated as sent then. It adds latency only: no loss, no reordering, no bandwidth limit, no jitter.

Prints "ready" once every address listens; exits when its stdin closes (the benchmark died) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading


async def forward(reader: asyncio.StreamReader, writer: asyncio.Future, hold: float, not_before: float) -> None:
    """Copy *reader* to the StreamWriter *writer* will hold, each chunk delivered *hold* s after it arrived
    (or after *not_before*), in order; the end of the stream is passed on as a half-close, delayed the same."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def pump() -> None:
        try:
            while chunk := await reader.read(65536):
                queue.put_nowait((max(loop.time(), not_before) + hold, chunk))
        except OSError:
            pass
        queue.put_nowait((max(loop.time(), not_before) + hold, b""))

    pumping = asyncio.ensure_future(pump())
    try:
        out = await writer
        while True:
            due, chunk = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not chunk:
                if out.can_write_eof() and not out.is_closing():
                    out.write_eof()
                return
            out.write(chunk)
            await out.drain()
    finally:
        pumping.cancel()


async def serve_one(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, target: tuple[str, int],
                    delay: float) -> None:
    loop = asyncio.get_running_loop()
    accepted = loop.time()
    upstream: asyncio.Future = loop.create_future()
    to_client: asyncio.Future = loop.create_future()
    to_client.set_result(client_w)
    # The client's data can leave only once its connect returned, one round trip after its SYN.
    sent = asyncio.ensure_future(forward(client_r, upstream, delay / 2, accepted + delay))
    try:
        await asyncio.sleep(1.5 * delay)  # the server accepts when the handshake's last ACK arrives
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError as exc:
        upstream.set_exception(exc)
        client_w.close()
        await asyncio.gather(sent, return_exceptions=True)
        return
    upstream.set_result(server_w)
    back = asyncio.ensure_future(forward(server_r, to_client, delay / 2, 0))
    await asyncio.gather(sent, back, return_exceptions=True)
    for w in (client_w, server_w):
        w.close()


async def main(routes: list[tuple[str, int, str, int]], delay: float) -> None:
    servers = []
    for listen_ip, listen_port, target_ip, target_port in routes:
        target = (target_ip, target_port)
        servers.append(await asyncio.start_server(
            lambda r, w, target=target: serve_one(r, w, target, delay), listen_ip, listen_port, backlog=1024))
    print("ready", flush=True)
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    await stop
    for server in servers:
        server.close()


def _exit_with_parent() -> None:
    """The benchmark holds our stdin: when it dies, however, we go too."""
    sys.stdin.read()
    os._exit(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, required=True, help="round-trip delay added")
    parser.add_argument("map", help='file of "LISTEN_IP PORT TARGET_IP PORT" lines')
    args = parser.parse_args()
    lines = [line.split() for line in open(args.map) if line.strip()]
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    asyncio.run(main([(a, int(b), c, int(d)) for a, b, c, d in lines], args.delay_ms / 1000))
