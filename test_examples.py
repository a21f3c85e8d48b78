"""The examples of "Never miss an update", run as a workshop runs them.

examples/flow.mjs on the official JavaScript client and examples/never_miss.py
on python-socketio, against real servers that are restarted in the middle (same
port, same database): what a client missed comes back once, in offset order,
and nothing twice.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import (
    MUG,
    SERVER,
    STICKERS,
    TSHIRT,
    WAIT_S,
    Tab,
    free_port,
    make_token,
    new_user_id,
    one_item_order,
)

FLOW = SERVER.parent / "examples" / "flow.mjs"
NEVER_MISS = SERVER.parent / "examples" / "never_miss.py"
OFFSET = r"[0-9a-f]{8}-[0-9]{16}"
LATE_S = 30          # a reconnect after a restart waits out socket.io's backoff


class Child:
    """A script run as a person runs it; its output is read in a thread, so
    every wait has a deadline and a failure shows what the script printed."""

    def __init__(self, command: list[str], stderr_path, stdin: bool = False) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                command, cwd=SERVER.parent, stdout=subprocess.PIPE, stderr=stderr, text=True,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        self.lines: list[str] = []
        self.ended = False
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_for(self, pattern: str, after: int = 0, timeout: float = LATE_S) -> int:
        """The index of the first line from `after` on that matches `pattern`."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for index in range(after, len(self.lines)):
                    if re.search(pattern, self.lines[index]):
                        return index
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    raise AssertionError(
                        f"no line matching {pattern!r} within {timeout}s"
                        f"{' (the output ended)' if self.ended else ''}:\n{self.report()}")
                self.changed.wait(left)

    def enter(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = LATE_S) -> int:
        """The exit status, once the output has ended too."""
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.report()}") from None
        with self.changed:
            self.changed.wait_for(lambda: self.ended, timeout)
        return returncode

    def interrupt(self) -> int:
        """Ctrl-C, and the exit status."""
        self.process.send_signal(signal.SIGINT)
        return self.finish()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def report(self) -> str:
        with self.changed:
            return "\n".join(self.lines) + f"\n--- stderr ---\n{self.stderr()}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def run(tmp_path):
    """Start a script: run("node", FLOW, url) -> Child; all are killed at the end."""
    children: list[Child] = []

    def start(*command, stdin: bool = False) -> Child:
        child = Child([str(part) for part in command],
                      tmp_path / f"child-{len(children)}-stderr.txt", stdin)
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


def restart(server) -> None:
    """Stop the server and start it again: same port (args), same database."""
    server.stop()
    server.start()


def api(server, path: str, token: str) -> dict:
    request = urllib.request.Request(server.url + path, headers={"Authorization": token})
    with urllib.request.urlopen(request, timeout=WAIT_S) as response:
        return json.load(response)


# -- examples/flow.mjs -------------------------------------------------------------

FLOW_EVENT = re.compile(rf"^(\w+) ← (\w+(?::\w+)?) (.*) @ ({OFFSET})$")
FLOW_SYNC = re.compile(rf"^(\w+) ← sync: replayed (\d+), complete (true|false) @ ({OFFSET})$")


def flow_events(lines: list[str]) -> list[tuple[str, str, str, str]]:
    """(socket, event, what, offset) of each durable event the script printed."""
    return [match.groups() for line in lines if (match := FLOW_EVENT.match(line))]


def assert_nothing_twice(lines: list[str]) -> None:
    """Per socket: no offset twice, and offsets only grow outside room messages."""
    events = flow_events(lines)
    for who in {who for who, *_ in events}:
        offsets = [offset for name, event, _, offset in events if name == who]
        assert len(offsets) == len(set(offsets)), f"{who} got an offset twice:\n{lines}"
        durable = [offset for name, event, _, offset in events
                   if name == who and event != "message"]
        assert durable == sorted(durable), f"{who}'s offsets went backwards:\n{lines}"


def assert_alice_caught_up(lines: list[str]) -> None:
    """After her reconnect alice first gets the paid and shipped updates of her
    order, with the stock they took, at the offsets the admin saw them live;
    then sync, complete, at the newest of them."""
    start = next(i for i, line in enumerate(lines) if line.startswith("== alice reconnects"))
    sync_at = next(i for i in range(start, len(lines))
                   if (m := FLOW_SYNC.match(lines[i])) and m[1] == "alice")
    caught_up = [(event, what, offset) for who, event, what, offset
                 in flow_events(lines[start:sync_at]) if who == "alice"]
    created = next(what for who, event, what, _ in flow_events(lines)
                   if (who, event) == ("alice", "order:created"))
    order = created.split()[0]
    assert [(event, what.split()[0] if event.startswith("product") else what)
            for event, what, _ in caught_up] == [
        ("order:updated", f"{order} paid"), ("product:stockUpdated", TSHIRT),
        ("product:stockUpdated", MUG), ("order:updated", f"{order} shipped")], lines
    seen_live = {(event, what): offset for who, event, what, offset in flow_events(lines)
                 if who == "admin"}
    assert [offset for *_, offset in caught_up] == [
        seen_live[(event, what)] for event, what, _ in caught_up], lines
    sync = FLOW_SYNC.match(lines[sync_at])
    assert sync.group(2, 3) == ("4", "true"), lines[sync_at]
    assert sync[4] >= caught_up[-1][2]


def assert_one_order_paid_once(server, stock_before: dict) -> None:
    """A retried create made no second order; a retried payment took stock once."""
    admin = server.get_json(f"/dev/token?user={new_user_id('auditor')}&role=admin")["token"]
    orders = api(server, "/api/orders", admin)["orders"]
    assert [(o["user"], o["status"]) for o in orders] == [("alice", "shipped")]
    assert {p: server.stock(p) for p in stock_before} == {
        TSHIRT: stock_before[TSHIRT] - 2, MUG: stock_before[MUG] - 1}


def test_flow_catches_alice_up_on_what_the_admin_did_while_she_was_away(start_server, run):
    server = start_server(env={"JWT_SECRET": None})      # dev tokens, as in a workshop
    stock_before = {p: server.stock(p) for p in (TSHIRT, MUG)}
    flow = run("node", FLOW, server.url)
    assert flow.finish() == 0, flow.report()
    assert flow.stderr() == ""
    lines = flow.lines
    assert_alice_caught_up(lines)
    assert_nothing_twice(lines)
    assert any(re.match(rf"bob ← notification:received Hi: Test @ {OFFSET}$", line)
               for line in lines), lines
    assert "admin ← message lobby: hi" in "\n".join(lines)
    assert_one_order_paid_once(server, stock_before)


def test_flow_step_by_step_survives_a_server_restart_in_the_middle(start_server, run):
    """The presenter restarts the server while the script waits for Enter before
    the admin pays, and presses Enter while it is still down: the payment waits
    for the reconnect, alice catches up from the restarted server, and the
    script finishes with what it prints without a restart, nothing twice."""
    server = start_server(env={"JWT_SECRET": None}, args=("--port", str(free_port())))
    url = server.url
    stock_before = {p: server.stock(p) for p in (TSHIRT, MUG)}
    flow = run("node", FLOW, server.url, "--step", stdin=True)
    prompt = 0
    for step in ("alice and the admin connect", "alice says hi", "alice places the order"):
        prompt = flow.wait_for(rf"^== {step}.* \[Enter\]$", after=prompt) + 1
        flow.enter()
    at = flow.wait_for(r"^== alice drops her connection.*\[Enter\]$", after=prompt)
    server.stop()
    for who in ("alice", "admin"):
        flow.wait_for(rf"^{who} lost the connection", after=at)
    flow.enter()                                  # while the server is down
    server.start()
    assert server.url == url
    flow.wait_for(rf"^admin ← sync: replayed 0, complete true @ {OFFSET}$", after=at)
    prompt = flow.wait_for(r"^paid paid$", after=at)
    for step in ("alice reconnects", "alice notifies bob"):
        prompt = flow.wait_for(rf"^== {step}.* \[Enter\]$", after=prompt) + 1
        flow.enter()
    assert flow.finish() == 0, flow.report()
    assert flow.stderr() == ""
    lines = flow.lines
    assert_alice_caught_up(lines)
    assert_nothing_twice(lines)
    assert re.match(rf"^bob ← notification:received Hi: Test @ {OFFSET}$", lines[-1]), lines
    assert "admin rejoined { ok: true, room: 'lobby', replayed: 0, complete: true }" in lines
    assert_one_order_paid_once(server, stock_before)


@pytest.mark.parametrize("again, said", [
    ("0a0a0a0a-0000000000000007", "alice got order:updated 0a0a0a0a-0000000000000007 twice"),
    ("0a0a0a0a-0000000000000006", "alice got order:updated 0a0a0a0a-0000000000000006 after"
                                  + " 0a0a0a0a-0000000000000007")])
def test_flow_stops_when_a_socket_gets_an_offset_twice_or_going_backwards(again, said):
    """The script's own guard (its code before `open`, which makes sockets), fed
    what the server never sends: exit 1 with one clear line. A room's older
    message is no fault."""
    guard = FLOW.read_text().split("\nconst open = ")[0]
    probe = guard.replace('import { io } from "socket.io-client";', "") + f"""
const socket = {{ name: "alice", offset: null, since: {{}} }};
const paid = {{ order: {{ _id: "o1", status: "paid" }} }};
keep(socket, "order:updated", {{ ...paid, offset: "0a0a0a0a-0000000000000007" }});
keep(socket, "message", {{ room: "lobby", offset: "0a0a0a0a-0000000000000003" }});
console.log("so far so good");
keep(socket, "order:updated", {{ ...paid, offset: "{again}" }});
"""
    done = subprocess.run(["node", "--input-type=module", "-e", probe], cwd=FLOW.parent,
                          capture_output=True, text=True, timeout=WAIT_S * 4, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (1, "so far so good\n", said + "\n")


# -- examples/never_miss.py --------------------------------------------------------

WATCHED = re.compile(rf"^\d\d:\d\d:\d\d  (\S+) +(.*) @ ({OFFSET})$")


def watched(lines: list[str]) -> list[tuple[str, str, str]]:
    """(what, detail, offset) of each line with an offset: events, sync, state."""
    return [match.groups() for line in lines if (match := WATCHED.match(line))]


def order_events(lines: list[str]) -> list[tuple[str, str, str, str]]:
    """(event, order id, status, offset) of each order event the watcher printed."""
    return [(what, *detail.split()[:2], offset) for what, detail, offset in watched(lines)
            if what.startswith("order:")]


def assert_in_offset_order_once(lines: list[str]) -> None:
    events = [offset for what, _, offset in watched(lines)
              if what.startswith(("order:", "product:", "notification:"))]
    assert events == sorted(set(events)), "\n".join(lines)


def kept_offset(state) -> str:
    return json.loads(state.read_text())["offset"]


def watch(run, server, token: str, state) -> Child:
    return run(sys.executable, NEVER_MISS, "--url", server.url, "--token", token,
               "--state", state)


class Shopper:
    """A test client placing orders, one connection per call to `session`."""

    def __init__(self, server) -> None:
        self.server, self.user = server, new_user_id("shopper")

    def order(self, *, pay: bool, quantity: int = 1) -> str:
        tab = Tab(self.server.url, make_token(self.user))
        try:
            order_id = tab.call("order:create", one_item_order(quantity=quantity))["order"]["_id"]
            if pay:
                assert tab.call("order:updateStatus",
                                {"orderId": order_id, "status": "paid"})["ok"]
            return order_id
        finally:
            tab.close()


def test_never_miss_prints_every_order_event_once_across_a_server_restart(start_server, run,
                                                                          tmp_path):
    server = start_server(args=("--port", str(free_port())))
    admin, state = make_token(new_user_id("watcher"), "admin"), tmp_path / "offset.json"
    shopper = Shopper(server)
    before = shopper.order(pay=False)              # the state it loads on its first run
    watcher = watch(run, server, admin, state)
    loaded = watcher.wait_for(rf"state loaded +@ {OFFSET}$")
    assert re.search(rf"state +{before} pending", "\n".join(watcher.lines[:loaded])), \
        watcher.report()
    watcher.wait_for(rf"sync +replayed 0, complete true @ {OFFSET}$")

    first, second = shopper.order(pay=True), shopper.order(pay=True)
    watcher.wait_for(rf"order:updated +{second} paid")
    disconnected = len(watcher.lines)
    restart(server)
    watcher.wait_for("disconnected", after=disconnected)
    third, fourth = shopper.order(pay=True), shopper.order(pay=False)
    back = watcher.wait_for(rf"sync +replayed \d+, complete true @ {OFFSET}$", after=disconnected)
    fifth = shopper.order(pay=True)
    paid = watcher.wait_for(rf"order:updated +{fifth} paid", after=back)
    watcher.wait_for("product:stockUpdated", after=paid)
    assert watcher.interrupt() == 0, watcher.report()
    assert watcher.lines[-1] == f"stopped; the offset is kept in {state}"

    lines = watcher.lines
    assert [event[:3] for event in order_events(lines)] == [
        (event, order, status) for order, statuses in
        ((first, "pending paid"), (second, "pending paid"), (third, "pending paid"),
         (fourth, "pending"), (fifth, "pending paid")) for event, status in
        zip(("order:created", "order:updated"), statuses.split())]
    assert_in_offset_order_once(lines)
    stock = [detail for what, detail, _ in watched(lines) if what == "product:stockUpdated"]
    assert len(stock) == 4 and all(d.startswith(f"{STICKERS} stock ") for d in stock), stock
    newest = api(server, "/api/orders", admin)["offset"]
    assert kept_offset(state) == newest == max(offset for *_, offset in watched(lines))
    assert watcher.stderr() == ""


def test_never_miss_started_again_catches_up_on_what_happened_while_it_was_off(start_server,
                                                                                run, tmp_path):
    server = start_server()
    admin, state = make_token(new_user_id("watcher"), "admin"), tmp_path / "offset.json"
    shopper = Shopper(server)
    seen = shopper.order(pay=True)
    watcher = watch(run, server, admin, state)
    watcher.wait_for(rf"sync +replayed 0, complete true @ {OFFSET}$")
    assert watcher.interrupt() == 0, watcher.report()
    assert order_events(watcher.lines) == []       # loaded as state, not as events
    offset_then = kept_offset(state)

    missed = [shopper.order(pay=True), shopper.order(pay=False)]
    tab = Tab(server.url, make_token(shopper.user))
    try:
        assert tab.call("order:updateStatus", {"orderId": seen, "status": "cancelled"})["ok"]
    finally:
        tab.close()

    again = watch(run, server, admin, state)
    sync = again.wait_for(rf"sync +replayed \d+, complete true @ {OFFSET}$")
    assert again.interrupt() == 0, again.report()
    lines = again.lines
    caught_up = watched(lines[:sync])
    assert [(event, order, status) for event, order, status, _ in order_events(lines)] == [
        ("order:created", missed[0], "pending"), ("order:updated", missed[0], "paid"),
        ("order:created", missed[1], "pending"), ("order:updated", seen, "cancelled")]
    assert [what for what, *_ in caught_up] == [
        "order:created", "order:updated", "product:stockUpdated", "order:created",
        "order:updated", "product:stockUpdated"]
    assert re.search(rf"sync +replayed {len(caught_up)}, complete true", lines[sync])
    assert not [line for line in lines if re.match(r"^\S+  state", line)], "\n".join(lines)
    assert_in_offset_order_once(lines)
    assert min(offset for *_, offset in caught_up) > offset_then
    assert kept_offset(state) == api(server, "/api/orders", admin)["offset"]
    assert watcher.stderr() == again.stderr() == ""


def test_never_miss_reloads_the_state_when_its_offset_is_of_another_log(start_server, run,
                                                                       tmp_path):
    server = start_server()
    admin, state = make_token(new_user_id("watcher"), "admin"), tmp_path / "offset.json"
    state.write_text(json.dumps({"offset": "00000000-0000000000000001"}))
    order = Shopper(server).order(pay=False)
    watcher = watch(run, server, admin, state)
    sync = watcher.wait_for(rf"sync +replayed 0, complete false @ {OFFSET}$")
    loaded = watcher.wait_for(rf"state loaded +@ {OFFSET}$", after=sync)
    assert re.search(rf"state +{order} pending", "\n".join(watcher.lines[sync:loaded]))
    assert kept_offset(state) == api(server, "/api/orders", admin)["offset"]
    assert watcher.interrupt() == 0, watcher.report()
