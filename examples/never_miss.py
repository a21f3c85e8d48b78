"""Never miss an update: a watcher that survives restarts, the server's and its own.

    pip install "python-socketio[asyncio-client]"
    python examples/never_miss.py --url http://127.0.0.1:8000 --token "Bearer eyJ..." \\
        [--state never_miss.json]

It prints every order, stock and notification event its token may see (an
admin's: every order's). Each carries an offset; the watcher keeps the
greatest in the state file and sends it as auth.serverOffset on every
connect and reconnect, so the server first replays what it missed, in order,
then says `sync`. On a first run (no state file yet), and when `sync` says
the offset is no longer enough (complete: false: older than the log keeps,
or of another database), it loads the orders over HTTP (GET /api/orders) and
goes on from that answer's offset. Ctrl-C stops it.
"""

import argparse
import asyncio
import functools
import json
import os
import sys
import time
from pathlib import Path

import aiohttp
import socketio

EVENTS = ("order:created", "order:updated", "product:stockUpdated", "notification:received")


def say(what: str, detail: str = "") -> None:
    print(f"{time.strftime('%H:%M:%S')}  {what:<21} {detail}", flush=True)


def about(data: dict) -> str:
    if "order" in data:
        order = data["order"]
        return f"{order['_id']} {order['status']} (user {order['user']}, total {order['total']})"
    if "productId" in data:
        return f"{data['productId']} stock {data['stock']} ({data['delta']:+d})"
    return f"from {data['from']}: {data['title']}"


class Watcher:
    def __init__(self, url: str, token: str, state: Path, http: aiohttp.ClientSession) -> None:
        self.url, self.state, self.http = url, state, http
        self.token = token if token.startswith("Bearer ") else f"Bearer {token}"
        self.offset = json.loads(state.read_text())["offset"] if state.exists() else None
        # The asyncio client handles events one at a time, in the order they
        # arrive (socketio.Client gives each a thread, and threads overtake).
        # It reconnects on its own, forever; Ctrl-C is left to asyncio.run.
        self.client = socketio.AsyncClient(handle_sigint=False, http_session=http)
        for name in EVENTS:
            self.client.on(name, functools.partial(self.on_event, name))
        self.client.on("sync", self.on_sync)
        self.client.on("connect", lambda: say("connected", self.url))
        self.client.on("disconnect", lambda reason: say("disconnected", str(reason)))

    def auth(self) -> dict:
        """The client calls this on every connect and reconnect."""
        return {"token": self.token, "serverOffset": self.offset}

    async def run(self) -> None:
        if self.offset is None:
            await self.load_state()              # a first run starts from the state now
        await self.client.connect(self.url, auth=self.auth, transports=["websocket"],
                                  wait_timeout=10)
        # Through every reconnect, until Ctrl-C: asyncio.run then cancels this
        # task, but not the client's own, which shutdown() ends (in watch).
        await asyncio.shield(self.client.wait())

    def on_event(self, name: str, data: dict) -> None:
        say(name, f"{about(data)} @ {data['offset']}")
        self.keep(data["offset"])

    async def on_sync(self, sync: dict) -> None:
        say("sync", f"replayed {sync['replayed']}, complete {json.dumps(sync['complete'])}"
                    f" @ {sync['offset']}")
        if sync["complete"]:
            self.keep(sync["offset"])
            return
        self.offset = None                       # perhaps of another log: the reload says
        try:
            await self.load_state()
        except OSError as error:
            print(f"never_miss.py: no state reloaded: {error}", file=sys.stderr, flush=True)

    async def load_state(self) -> None:
        """Every order as it is now, page by page, and the log position of the
        first page: what changes after it comes as events, none lost."""
        offset, before = None, ""
        while True:
            page = await self.get(f"/api/orders?limit=100{before}")
            offset = offset or page["offset"]
            for order in page["orders"]:
                say("state", f"{order['_id']} {order['status']} (user {order['user']})")
            if not page["next"]:
                break
            before = f"&before={page['next']}"
        self.keep(offset)
        say("state loaded", f"@ {offset}")

    async def get(self, path: str) -> dict:
        async with self.http.get(self.url + path, headers={"Authorization": self.token},
                                 timeout=aiohttp.ClientTimeout(total=10)) as response:
            if response.status != 200:
                raise OSError(f"GET {path} answered {response.status}: {await response.text()}")
            return await response.json()

    def keep(self, offset: str) -> None:
        """The greatest offset so far, in memory and in the state file (written
        whole, then renamed: a crash never leaves half a file)."""
        if self.offset is None or offset > self.offset:
            self.offset = offset
            draft = self.state.with_name(self.state.name + ".new")
            draft.write_text(json.dumps({"offset": offset}) + "\n")
            os.replace(draft, self.state)


async def watch(url: str, token: str, state: Path) -> None:
    async with aiohttp.ClientSession() as http:  # the socket's and GET's, closed at the end
        watcher = Watcher(url, token, state, http)
        try:
            await watcher.run()
        finally:
            await watcher.client.shutdown()      # no more reconnects; the connection closed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="never_miss.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    parser.add_argument("--token", required=True, help="a Bearer token, e.g. the one"
                        " `python server.py token admin-1 --role admin` prints")
    parser.add_argument("--state", default="never_miss.json",
                        help="the file that keeps the offset (default never_miss.json)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(watch(args.url.rstrip("/"), args.token, Path(args.state)))
    except KeyboardInterrupt:
        print(f"\nstopped; the offset is kept in {args.state}", flush=True)
    except (OSError, socketio.exceptions.ConnectionError) as error:
        print(f"never_miss.py: {args.url}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
