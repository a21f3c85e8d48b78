"""Test harness: real server.py processes on free ports, real Socket.IO clients."""

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import jwt
import pytest
import referencing
import socketio
import websocket

HERE = Path(__file__).resolve().parent
SERVER = HERE / "server.py"
SECRET = "test-secret-that-is-long-enough-for-hs256"
START_TIMEOUT_S = 20
WAIT_S = 5

TSHIRT = "64a1b2c3d4e5f67890123456"
MUG = "64a1b2c3d4e5f67890123457"
STICKERS = "64a1b2c3d4e5f67890123458"
POSTER = "64a1b2c3d4e5f67890123459"

# The original document's example order.
EXAMPLE_ORDER = {
    "items": [{"product": TSHIRT, "quantity": 2, "price": 100},
              {"product": MUG, "quantity": 1, "price": 150}],
    "total": 350,
}


OFFSET = re.compile(r"[0-9a-f]{8}-[0-9]{16}")


def logged(data: dict) -> dict:
    """A durable event's payload without its offset, which it must carry."""
    assert OFFSET.fullmatch(data.get("offset", "")), f"no offset in {data}"
    return {key: value for key, value in data.items() if key != "offset"}


def one_item_order(product=STICKERS, quantity=1, price=25, **extra):
    return {"items": [{"product": product, "quantity": quantity, "price": price}],
            "total": round(price * quantity, 2), **extra}


class Contract:
    """asyncapi.json as the tests hold the server to it: the schema of each
    client event's request and ack, and of each server event, by event name."""

    URI = "urn:shop-realtime:asyncapi"

    def __init__(self, path: Path) -> None:
        self.document = json.loads(path.read_text())
        self.registry = referencing.Registry().with_resource(
            self.URI, referencing.Resource.from_contents(
                self.document, default_specification=referencing.jsonschema.DRAFT7))
        messages = self.document["components"]["messages"]
        by_key = {f"#/channels/shop/messages/{key}": key for key in messages}
        self.requests, self.acks, self.emits = {}, {}, {}
        for operation in self.document["operations"].values():
            key = by_key[operation["messages"][0]["$ref"]]
            name = messages[key]["name"]
            if operation["action"] == "receive":
                self.requests[name] = key
                self.acks[name] = by_key[operation["reply"]["messages"][0]["$ref"]]
            else:
                self.emits[name] = key

    def validator(self, pointer: str) -> jsonschema.Draft7Validator:
        return jsonschema.Draft7Validator({"$ref": f"{self.URI}{pointer}"},
                                          registry=self.registry)

    def problems(self, pointer: str, value) -> list[str]:
        return [f"{'.'.join(map(str, e.absolute_path)) or 'payload'}: {e.message}"
                for e in self.validator(pointer).iter_errors(value)]

    def message(self, key: str) -> str:
        return f"#/components/messages/{key}/payload"

    def ack_problems(self, event: str, ack) -> list[str]:
        """What the document does not allow in the ack of `event`."""
        if event in self.acks:
            return self.problems(self.message(self.acks[event]), ack)
        return self.problems("#/components/schemas/UnknownEvent", ack)

    def emit_problems(self, event: str, data) -> list[str]:
        """What the document does not allow in a server event."""
        if event not in self.emits:
            return [f"{event!r} is no server event of the document"]
        return self.problems(self.message(self.emits[event]), data)


CONTRACT = Contract(HERE / "asyncapi.json")
NOTHING = object()
FENCE = "fence-"        # rooms of Tab.fence
_ids = itertools.count(1)
# What a server must never write: a traceback is a bug by definition, and so
# are the lines eventlet and logging write when something is left unhandled.
LOG_DEFECTS = ("Traceback (most recent call last)", "socket shutdown error",
               "--- Logging error ---")
started_servers: list["ServerProcess"] = []


def new_user_id(prefix: str = "user") -> str:
    """A user id no other test uses, so presence and notifications don't mix."""
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


def make_token(user_id, role="user", secret=SECRET, bearer=True, **claims) -> str:
    payload = {"sub": user_id, "role": role, "exp": int(time.time()) + 3600, **claims}
    if user_id is None:
        payload.pop("sub")
    token = jwt.encode(payload, secret, algorithm="HS256")
    return f"Bearer {token}" if bearer else token


class ServerProcess:
    """`python server.py` on a free port with its own database."""

    def __init__(self, workdir: Path, env: dict | None = None, args: tuple = (),
                 db: Path | None = None, script: Path = SERVER) -> None:
        self.workdir, self.script = workdir, script
        self.db = db or workdir / "shop.db"
        self.env = {**os.environ, "JWT_SECRET": SECRET, "RATE_LIMITS": "off", **(env or {})}
        self.env = {k: v for k, v in self.env.items() if v is not None}
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "ServerProcess":
        self.stdout_path = self.workdir / f"stdout-{next(_ids)}.txt"
        self.stderr_path = self.workdir / f"stderr-{next(_ids)}.txt"
        started_servers.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), "--port", "0", "--db", str(self.db), *self.args],
            cwd=self.workdir, env=self.env,
            stdout=self.stdout_path.open("w"), stderr=self.stderr_path.open("w"))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            banner = self.stdout()
            match = re.search(r"\(tester page: (http://\S+?)/\)", banner)
            if match and "Ctrl-C to stop." in banner:     # the banner's last line is out
                self.url = match[1]
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"server did not start:\n{self.stdout()}\n{self.stderr()}")

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for_log(self, pattern: str, timeout: float = WAIT_S) -> re.Match:
        """The first match of a regular expression in the server's log, waited for."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.stderr())):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the log within {timeout}s:\n"
                                     f"{self.stderr()}")
            time.sleep(0.05)
        return match

    def log_size(self) -> int:
        return self.stderr_path.stat().st_size

    def log_defects(self, since: int = 0) -> str:
        """What the server logged after byte `since`, if any of it is a defect."""
        with self.stderr_path.open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        return text if any(defect in text for defect in LOG_DEFECTS) else ""

    def get(self, path: str) -> tuple[int, str, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=WAIT_S) as response:
                return response.status, response.read().decode(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(), dict(error.headers)

    def get_json(self, path: str):
        status, body, _ = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def stock(self, product_id: str) -> int:
        return next(p["stock"] for p in self.get_json("/api/products") if p["_id"] == product_id)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Tab:
    """One browser tab: a python-socketio Client that records every event."""

    def __init__(self, url: str, token: str | None = None, transports=("websocket",),
                 headers: dict | None = None, auth: dict | None = None, query: str = "") -> None:
        self.client = socketio.Client(reconnection=False)
        self.events: list[tuple[str, object]] = []
        self.breaches: list[str] = []            # what the server sent that asyncapi.json forbids
        self.changed = threading.Condition()
        self.client.on("*", self._record)
        self.client.on("disconnect", self._on_disconnect)
        self.disconnected = threading.Event()
        if auth is None and token is not None:
            auth = {"token": token}
        self.client.connect(url + query, auth=auth, headers=headers or {},
                            transports=list(transports), wait_timeout=WAIT_S)
        self.sid = self.client.get_sid()

    def _record(self, event, *args):
        data = args[0] if len(args) == 1 else args
        problems = CONTRACT.emit_problems(event, data)
        with self.changed:
            self.events.append((event, data))
            self.breaches += [f"server event {event!r} {json.dumps(data)[:300]}: {p}"
                              for p in problems]
            self.changed.notify_all()

    def _on_disconnect(self, *args):
        self.disconnected.set()

    def call(self, event: str, payload=NOTHING, timeout: float = WAIT_S):
        """Emit with an ack and return the ack. Without a payload no argument is sent."""
        if payload is NOTHING:
            ack = self.client.call(event, timeout=timeout)
        else:
            ack = self.client.call(event, (payload,), timeout=timeout)
        problems = CONTRACT.ack_problems(event, ack)
        assert not problems, f"the ack of {event!r} breaks asyncapi.json: {ack}: {problems}"
        return ack

    def received(self, event: str) -> list:
        """Every `event` so far (a fence's own messages left out)."""
        with self.changed:
            return [data for name, data in self.events if name == event
                    and not (name == "message" and str(data.get("room")).startswith(FENCE))]

    def fence(self) -> None:
        """A round trip to this tab through the server, for "nothing arrived":
        the server sends a socket's events in order, so whatever it sent this
        tab before the fence message has arrived once the fence has."""
        room, marker = f"{FENCE}{self.sid}", f"fence {next(_ids)}"
        assert self.call("joinRoom", room)["ok"]
        assert self.call("message", {"room": room, "text": marker})["ok"]
        self.wait_for("message", lambda data: data["text"] == marker)

    def wait_for(self, event: str, match=lambda data: True, timeout: float = WAIT_S):
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for name, data in self.events:
                    if name == event and match(data):
                        return data
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {event!r} matching within {timeout}s; "
                                         f"got {self.events}")
                self.changed.wait(left)

    def wait_count(self, event: str, count: int, timeout: float = WAIT_S) -> list:
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.received(event)) < count and time.monotonic() < deadline:
                self.changed.wait(0.05)
        return self.received(event)

    def close(self) -> None:
        if self.client.connected:
            self.client.disconnect()


class WireTab(Tab):
    """A tab read straight off its websocket, one frame after the other, for
    checks of the order in which events arrive: python-socketio's Client runs
    each incoming event in a thread of its own, and one may overtake another."""

    def __init__(self, url: str, auth: dict | None = None) -> None:
        self.events, self.breaches, self.acks = [], [], {}
        self.changed = threading.Condition()
        self.ack_ids = itertools.count(1)
        self.ws = websocket.create_connection(
            url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket", timeout=WAIT_S)
        assert self.ws.recv().startswith("0")
        self.ws.send("40" + json.dumps(auth or {}))
        connected = self.ws.recv()
        assert connected.startswith("40{"), connected
        self.sid = json.loads(connected[2:])["sid"]
        self.ws.settimeout(None)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                frame = self.ws.recv()
            except (websocket.WebSocketException, OSError):
                return
            if frame == "2":
                self.ws.send("3")                       # Engine.IO ping
            elif frame.startswith("42"):
                self._record(*json.loads(frame[2:]))
            elif match := re.match(r"43(\d+)", frame):
                with self.changed:
                    self.acks[int(match[1])] = json.loads(frame[match.end():])[0]
                    self.changed.notify_all()

    def call(self, event: str, payload=NOTHING, timeout: float = WAIT_S):
        ack_id = next(self.ack_ids)
        packet = [event] if payload is NOTHING else [event, payload]
        self.ws.send(f"42{ack_id}" + json.dumps(packet))
        deadline = time.monotonic() + timeout
        with self.changed:
            while ack_id not in self.acks:
                left = deadline - time.monotonic()
                assert left > 0, f"no ack to {event!r} within {timeout}s"
                self.changed.wait(left)
            ack = self.acks[ack_id]
        problems = CONTRACT.ack_problems(event, ack)
        assert not problems, f"the ack of {event!r} breaks asyncapi.json: {ack}: {problems}"
        return ack

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(autouse=True)
def server_logs_have_no_traceback(request):
    """Every test fails when a server it used logged a traceback (or another
    defect) meanwhile, with the log in the failure; a test that provokes one
    on purpose says so with @pytest.mark.provokes_traceback."""
    logged_before = {id(process): process.log_size() for process in started_servers}
    yield
    if request.node.get_closest_marker("provokes_traceback"):
        return
    defects = []
    for process in started_servers:
        text = process.log_defects(logged_before.get(id(process), 0))
        if text:
            defects.append(f"--- {process.stderr_path} ---\n{text}")
    started_servers[:] = [p for p in started_servers if p.proc and p.proc.poll() is None]
    if defects:
        pytest.fail("a server logged a traceback:\n" + "\n".join(defects), pytrace=False)


def typing_in(room: str, by: str) -> dict:
    """A `typing` event as the server sends it for `room`, to send from outside any socket."""
    at = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return {"event": "typing", "from": by, "room": room, "at": at}


def assert_admin_rooms_reach_admins_alone(emit, admins: list[Tab], user: Tab,
                                          user_id: str) -> None:
    """`emit(room, data)` sends a `typing` event to one room from outside any
    socket. Sent to `admin` alone, then to `admins` alone, it reaches every
    admin tab and not the user's tab: a `typing` to the user's own room, sent
    next the same way, reaches that tab (the positive control) after anything
    sent before it (the fence)."""
    for tab in (*admins, user):
        tab.fence()       # with Redis: each process now reads what is published
    for room in ("admin", "admins"):
        marker, fence = f"to-{room}-{next(_ids)}", f"after-{room}-{next(_ids)}"
        emit(room, typing_in(room, marker))
        emit(f"user:{user_id}", typing_in(f"user:{user_id}", fence))
        for tab in admins:
            tab.wait_for("typing", lambda data, by=marker: data["from"] == by)
        user.wait_for("typing", lambda data, by=fence: data["from"] == by)
        assert marker not in [data["from"] for data in user.received("typing")], \
            f"a user's tab got what was sent to {room!r} alone"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The shared server: rate limits off, a known JWT secret."""
    process = ServerProcess(tmp_path_factory.mktemp("shared")).start()
    yield process
    process.stop()


@pytest.fixture
def start_server(tmp_path):
    """Start a server of the test's own, e.g. start_server(env={"REQUIRE_AUTH": "1"})."""
    started = []

    def start(env=None, args=(), db=None, script=SERVER):
        process = ServerProcess(tmp_path, env, args, db, script).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def connect(server):
    """Open tabs on a server: the shared one, another (`on=`), or any `url=`."""
    tabs = []

    def open_tab(user_id=None, role="user", on=None, token=None, url=None, wire=False,
                 **kwargs):
        """wire=True: a WireTab, for checks of the order events arrive in."""
        if token is None and user_id is not None:
            token = make_token(user_id, role)
        if wire:
            auth = kwargs.get("auth") or ({"token": token} if token else {})
            tab = WireTab(url or (on or server).url, auth)
        else:
            tab = Tab(url or (on or server).url, token, **kwargs)
        tabs.append(tab)
        return tab

    yield open_tab
    for tab in tabs:
        tab.close()
    breaches = [breach for tab in tabs for breach in tab.breaches]
    if breaches:
        pytest.fail("the server sent what asyncapi.json does not allow:\n" + "\n".join(breaches),
                    pytrace=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisProcess:
    """A throwaway redis-server on loopback, with nothing saved to disk."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisProcess":
        server = shutil.which("redis-server")
        assert server, "redis-server is needed (apt-get install redis-server)"
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    process = RedisProcess(tmp_path).start()
    yield process
    process.stop()


@pytest.fixture
def start_cluster(start_server, redis_server, tmp_path):
    """start_cluster(3) -> three server.py processes sharing one Redis and one database."""
    def start(count, env=None):
        return [start_server(env={"REDIS_URL": redis_server.url, **(env or {})},
                             db=tmp_path / "cluster.db") for _ in range(count)]
    return start
