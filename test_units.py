"""The pure parts of server.py, imported and called directly: settings,
money, tokens, payload parsing, room names and the order rules.

Importing server.py starts nothing, patches nothing and opens nothing, so
these run in milliseconds; what they decide is also tested end to end over
real sockets in test_server.py.
"""

import argparse
import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

import adapters
import server
from conftest import MUG, SERVER, TSHIRT
from server import ConfigError, Product, Refusal, User

NO_FLAGS = argparse.Namespace(host=None, port=None, db=None, require_auth=False, verbose=False)


def refusal(call, *args) -> dict:
    with pytest.raises(Refusal) as refused:
        call(*args)
    return refused.value.ack


# -- importing -----------------------------------------------------------------

def test_importing_server_starts_patches_and_opens_nothing(tmp_path):
    script = ("import threading, warnings; warnings.simplefilter('ignore');"
              "import server, eventlet.patcher;"
              "assert not any(eventlet.patcher.is_monkey_patched(module) for module in"
              " ('socket', 'thread', 'time', 'select', 'os'));"
              "assert threading.active_count() == 1;"
              "print('clean')")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, check=False,
                          env={"PYTHONPATH": str(SERVER.parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr
    assert list(tmp_path.iterdir()) == []       # no database, no secret, no log


# -- settings --------------------------------------------------------------------

def test_no_settings_give_the_documented_defaults():
    cfg = server.load_config(NO_FLAGS, {})
    assert (cfg.host, cfg.port, str(cfg.database)) == ("127.0.0.1", 8000, "app.db")
    assert cfg.jwt_secret is None and cfg.redis_url is None and cfg.cors_origins == "*"
    assert cfg.max_payload_bytes == 100_000 and cfg.connect_timeout_s == 45
    assert cfg.rate_limits == server.DEFAULT_RATE_LIMITS and cfg.notify_queue is True


def test_flags_win_over_the_environment():
    flags = argparse.Namespace(host="0.0.0.0", port="9001", db="x.db", require_auth=True,
                               verbose=False)
    cfg = server.load_config(flags, {"HOST": "127.0.0.2", "PORT": "9002", "DATABASE": "y.db",
                                     "REQUIRE_AUTH": "0"})
    assert (cfg.host, cfg.port, str(cfg.database), cfg.require_auth) == \
        ("0.0.0.0", 9001, "x.db", True)


@pytest.mark.parametrize("env, message", [
    ({"PORT": "http"}, "port must be a number from 0 to 65535, got 'http'"),
    ({"PORT": "70000"}, "port must be a number from 0 to 65535, got '70000'"),
    ({"RATE_LIMITS": "message=lots"}, "RATE_LIMITS: 'message=lots' is not event=N/window"),
    ({"RATE_LIMITS": "mesage=5/10s"}, "RATE_LIMITS: unknown event 'mesage'"),
    ({"RATE_LIMITS": "message=5/soon"}, "RATE_LIMITS: bad duration 'soon'"),
    ({"RATE_LIMITS": "message=0/10s"}, "RATE_LIMITS: message needs at least 1 event per window"),
    ({"MAX_PAYLOAD_BYTES": "big"}, "MAX_PAYLOAD_BYTES must be a whole number >= 1000"),
    ({"MAX_PAYLOAD_BYTES": "999"}, "MAX_PAYLOAD_BYTES must be a whole number >= 1000"),
    ({"REQUIRE_AUTH": "maybe"}, "REQUIRE_AUTH must be 1 or 0, got 'maybe'"),
    ({"NOTIFY_QUEUE": "sometimes"}, "NOTIFY_QUEUE must be 1 or 0"),
    ({"ADMIN_UI": "nopassword"}, "ADMIN_UI must be user:password"),
    ({"CONNECT_TIMEOUT": "soon"}, "CONNECT_TIMEOUT: bad duration 'soon'"),
])
def test_a_bad_setting_is_a_config_error_that_names_it(env, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace("*", r"\*")):
        server.load_config(NO_FLAGS, env)


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("10s", 10), ("5m", 300),
                                           ("24h", 86400), ("7d", 604800), ("2.5", 2.5)])
def test_durations(text, seconds):
    assert server.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "-1s", "soon", "10 years"])
def test_a_duration_must_be_positive_with_a_known_unit(text):
    with pytest.raises(ConfigError):
        server.parse_duration(text)


def test_rate_limits_override_the_defaults_event_by_event():
    limits = server.parse_rate_limits("message=5/10s, order:create=1/1m, *=100/1s")
    assert limits["message"] == (5, 10) and limits["order:create"] == (1, 60)
    assert limits["*"] == (100, 1) and limits["typing"] == server.DEFAULT_RATE_LIMITS["typing"]
    assert server.parse_rate_limits("off") is None and server.parse_rate_limits(" OFF ") is None


def test_allowed_hosts_are_host_names_without_ports():
    cfg = server.load_config(NO_FLAGS, {"ALLOWED_HOSTS": "Shop.Lan:8000, other.lan"})
    assert cfg.allowed_hosts == ("shop.lan", "other.lan")


# -- money -------------------------------------------------------------------------

@pytest.mark.parametrize("amount, cents", [(350, 35000), (19.99, 1999), (0.1, 10), (0.015, 2),
                                           (99.995, 10000), (5e-324, 0), (0, 0),
                                           (1e308, 10 ** 310), (-1e308, -(10 ** 310))])
def test_money_becomes_whole_cents_half_up_whatever_its_size(amount, cents):
    assert server.to_cents(amount) == cents


def test_cents_print_as_the_original_numbers():
    assert (server.from_cents(35000), server.from_cents(1999)) == (350, 19.99)


# -- tokens ---------------------------------------------------------------------------

SECRET = "unit-secret-unit-secret-unit-secret-unit"


def token(secret=SECRET, **claims) -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, secret, algorithm="HS256")


@pytest.mark.parametrize("claims, user_id", [({"sub": "a"}, "a"), ({"id": 42}, "42"),
                                             ({"userId": "u"}, "u"), ({"_id": "m"}, "m"),
                                             ({"sub": "", "id": "b"}, "b")])
def test_the_user_id_comes_from_sub_else_id_userid_or__id(claims, user_id):
    user, why = server.authenticate("Bearer " + token(**claims), SECRET)
    assert (user.id, why) == (user_id, "")


@pytest.mark.parametrize("given, why", [
    (None, "no token"), ("", "no token"), ("Bearer ", "no token"), (42, "invalid token"),
    ("Bearer not-a-jwt", "invalid token"), (token(secret="another-secret-" * 3, sub="a"),
                                            "invalid token"),
    (token(sub="a", exp=int(time.time()) - 120), "token expired"),
    (token(role="admin"), "invalid token"),             # no id claim
    (token(sub="a\x00"), "invalid token"), (token(sub="a", name="\ud800"), "invalid token"),
    (jwt.encode({"sub": "a"}, None, algorithm="none"), "invalid token"),
])
def test_a_token_that_names_nobody_is_anonymous_with_the_reason(given, why):
    assert server.authenticate(given, SECRET) == (None, why)


def test_claims_give_role_email_name_and_verification():
    user, _ = server.authenticate(token(sub="a", role="admin", email="a@x.io", name="Al",
                                        isVerified=True), SECRET)
    assert user == User("a", "admin", "a@x.io", "Al", True)
    user, _ = server.authenticate(token(sub="a", role="root", isVerified="yes"), SECRET)
    assert (user.role, user.is_verified) == ("user", False)


def test_issued_tokens_carry_name_and_lifetime():
    claims = jwt.decode(server.issue_token(SECRET, "alice", "admin", name="Alice", ttl_s=60)[7:],
                        SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["role"], claims["name"]) == ("alice", "admin", "Alice")
    assert claims["exp"] - claims["iat"] == 60


# -- payloads ---------------------------------------------------------------------------

@pytest.mark.parametrize("data, room", [("lobby", "lobby"), ({"room": " lobby "}, "lobby"),
                                        ("x" * 64, "x" * 64)])
def test_room_names_are_1_to_64_characters_after_trimming(data, room):
    assert server.room_name(data) == room


@pytest.mark.parametrize("data", ["", "   ", "x" * 65, 5, None, {"room": []}])
def test_other_room_names_are_invalid_payload(data):
    assert refusal(server.room_name, data)["error"] == "Invalid payload"


ORDER = {"items": [{"product": TSHIRT, "quantity": 2, "price": 100},
                   {"product": MUG, "quantity": 1, "price": 150}], "total": 350}


def test_an_order_request_is_read_in_cents():
    request = server.parse_order_request(ORDER)
    assert request.items == [(TSHIRT, 2, 10000), (MUG, 1, 15000)]
    assert request.total_cents == 35000 and request.product_ids == {TSHIRT, MUG}


@pytest.mark.parametrize("change, error", [
    ({"items": []}, "items must be a non-empty array"),
    ({"items": [{"product": TSHIRT, "quantity": 1, "price": 1}] * 101}, "too many items"),
    ({"items": [{"product": "x", "quantity": 1, "price": 1}]},
     'Cast to ObjectId failed for value "x" at path "items.0.product"'),
    ({"items": [{"product": TSHIRT, "quantity": 1}]}, "items.0.price: Path 'price' is required"),
    ({"items": [{"product": TSHIRT, "price": 1}]},
     "items.0.quantity: Path 'quantity' is required"),
    ({"items": [{"product": TSHIRT, "quantity": True, "price": 1}]},
     "items.0.quantity must be a positive integer"),
    ({"items": [{"product": TSHIRT, "quantity": 1, "price": -1}]},
     "items.0.price must be a non-negative number"),
    ({"total": None}, "total: Path 'total' is required"),
    ({"total": "350"}, "total must be a number"),
])
def test_order_requests_fail_with_the_protocols_first_message(change, error):
    assert refusal(server.parse_order_request, {**ORDER, **change}) == {"error": error}


CATALOGUE = {TSHIRT: Product(10000, 50), MUG: Product(15000, 1)}


def test_an_order_that_matches_the_catalogue_passes_its_rules():
    server.check_order(server.parse_order_request(ORDER), CATALOGUE)


@pytest.mark.parametrize("order, error", [
    ({**ORDER, "items": [{"product": "64a1b2c3d4e5f678901234ff", "quantity": 1, "price": 1}]},
     "Product not found: 64a1b2c3d4e5f678901234ff"),
    ({**ORDER, "items": [{"product": MUG, "quantity": 1, "price": 1e308}], "total": 150},
     "Price mismatch for items.0 (catalogue price 150)"),
    ({**ORDER, "total": 1e300}, "Total mismatch (expected 350)"),
    ({"items": [{"product": MUG, "quantity": 2, "price": 150}], "total": 300},
     f"Insufficient stock for product {MUG}"),
])
def test_orders_against_the_catalogue_fail_first_failure_first(order, error):
    assert refusal(server.check_order, server.parse_order_request(order), CATALOGUE) == {
        "error": error}


OWNER, OTHER, ADMIN = User("owner"), User("other"), User("boss", "admin")


@pytest.mark.parametrize("user, current, target, error", [
    (OWNER, None, "paid", "Order not found"),
    (OTHER, "pending", "paid", "Access denied"),
    (OWNER, "pending", "lost", "Invalid status"),
    (OWNER, "pending", "shipped", "Invalid status transition: pending -> shipped"),
    (OWNER, "paid", "shipped", "Access denied"),
    (ADMIN, "completed", "cancelled", "Invalid status transition: completed -> cancelled"),
])
def test_status_changes_follow_the_transitions_and_who_may_make_them(user, current, target,
                                                                       error):
    owner = None if current is None else "owner"
    assert refusal(server.check_status_change, user, owner, current, target) == {"error": error}


def test_setting_the_status_an_order_has_changes_nothing():
    assert server.check_status_change(OWNER, "owner", "paid", "paid") is False
    assert server.check_status_change(ADMIN, "owner", "paid", "shipped") is True


@pytest.mark.parametrize("current, target, sign", [("pending", "paid", -1),
                                                   ("paid", "cancelled", +1),
                                                   ("pending", "cancelled", 0),
                                                   ("paid", "shipped", 0)])
def test_stock_moves_entering_paid_and_back_from_paid_to_cancelled(current, target, sign):
    assert server.stock_movement(current, target) == sign


def test_notification_defaults_and_bounds():
    to, fields = server.parse_notification({"toUserId": "bob"})
    assert to == "bob" and (fields["type"], fields["priority"]) == ("info", "normal")
    assert refusal(server.parse_notification, {"toUserId": " "}) == {
        "error": "toUserId is required"}
    assert refusal(server.parse_notification, {"toUserId": "b", "type": "x"}) == {
        "error": "Invalid type"}
    assert refusal(server.parse_notification, {"toUserId": "b", "title": "t" * 201})[
        "detail"] == "title must be at most 200 characters"


@pytest.mark.parametrize("value, why", [
    ({"a": ["ok", {"b": "\x00"}]}, "a.1.b contains a NUL character"),
    ({"k\ud800": 1}, "a key of the payload contains a lone UTF-16 surrogate (half of a character)"),
    ("😀 fine", None),
])
def test_strings_with_nul_or_lone_surrogates_are_found_by_their_path(value, why):
    assert server.unsafe_text(value) == why


@pytest.mark.parametrize("frame, problem", [("hello", 1002), ("", 1002), ("0", 1002),
                                            ("b!!", 1002), ("x" * 2001, 1009), ("42[]", None),
                                            ("2", None), (b"\x01", None)])
def test_websocket_frames_that_are_not_engineio_packets(frame, problem):
    found = adapters.frame_problem(frame, 2000)
    assert (found and found[0]) == problem


@pytest.mark.parametrize("host, allowed", [("localhost:8000", True), ("127.0.0.1", True),
                                           ("[::1]:8000", True), ("10.0.0.5:8000", True),
                                           ("evil.example:8000", False),
                                           ("shop.lan:8000", True)])
def test_dev_token_hosts_are_ip_addresses_localhost_or_listed(host, allowed):
    assert server.host_allowed(host, ("shop.lan",)) is allowed


# -- server.py speaks the libraries' public API only ------------------------------

LIBRARIES = ("socketio", "engineio", "eventlet")


def test_server_py_names_no_private_name_of_the_libraries():
    """A leading underscore read or overridden, a library attribute assigned
    (a monkey-patch), or the introspection adapters.py does: none in server.py."""
    tree = ast.parse(Path(server.__file__).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            found.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.ClassDef):
            found += [f"line {item.lineno}: def {item.name}" for item in node.body
                      if isinstance(item, ast.FunctionDef) and item.name.startswith("_")
                      and not item.name.startswith("__")]
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(target, ast.Attribute) and isinstance(root, ast.Name) \
                        and root.id in LIBRARIES:
                    found.append(f"line {node.lineno}: assigns {ast.unparse(target)}")
    text = Path(server.__file__).read_text()
    found += [word for word in ("__self__", "uses_binary_events", "max_decode_packets",
                                "eio.sockets", "getcurrent") if word in text]
    assert found == []


def test_the_adapters_name_the_versions_they_were_tested_with():
    pinned = dict(line.split("==") for line in
                  (Path(server.__file__).parent / "requirements.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    assert {name: pinned[name] for name in adapters.TESTED_WITH} == adapters.TESTED_WITH
    assert adapters.check_versions() == []          # this venv has what requirements.txt pins


def test_another_library_version_is_named_with_the_tested_one(monkeypatch):
    real = adapters.importlib.metadata.version
    monkeypatch.setattr(adapters.importlib.metadata, "version",
                        lambda name: "9.9.9" if name == "eventlet" else real(name))
    assert adapters.check_versions() == [
        f"eventlet 9.9.9 (tested: {adapters.TESTED_WITH['eventlet']})"]


def test_importing_server_changes_no_warning_filter():
    """The libraries set their own filters (requests and urllib3 do, on
    import); server.py and adapters.py add none and show no warning."""
    code = ("import warnings\nwith warnings.catch_warnings():\n"
            "    warnings.simplefilter('ignore'); import eventlet, engineio, socketio, jwt\n"
            "before = list(warnings.filters); import server;"
            " print(warnings.filters == before)")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                            text=True, cwd=Path(server.__file__).parent, timeout=60, check=False)
    assert result.stdout.strip() == "True", result.stderr
    alone = subprocess.run([sys.executable, "-W", "error", "-c", "import server"],
                           capture_output=True, text=True, cwd=Path(server.__file__).parent,
                           timeout=60, check=False)
    assert alone.returncode == 0 and alone.stderr == "", alone.stderr


# -- offsets --------------------------------------------------------------------------

def test_offsets_of_one_log_compare_as_strings_in_log_order():
    log_id = "0123abcd"
    offsets = [f"{log_id}-{seq:016d}" for seq in (1, 9, 10, 99, 100, 10**12)]
    assert sorted(offsets) == offsets
    assert all(server.OFFSET.fullmatch(offset) for offset in offsets)


@pytest.mark.parametrize("name, fields, rooms", [
    ("order:created", {"user_id": "u1"}, ["user:u1", "admin", "admins"]),
    ("order:updated", {"user_id": "u1"}, ["user:u1", "admin", "admins"]),
    ("notification:received", {"user_id": "u2"}, "user:u2"),
    ("message", {"room": "lobby"}, "lobby"),
    ("product:stockUpdated", {}, None),
])
def test_each_logged_event_goes_to_its_audience(name, fields, rooms):
    assert server.audience(server.LogEntry(1, name, {}, "{}", **fields)) == rooms


def test_every_durable_event_is_described_with_an_offset():
    document = json.loads((Path(server.__file__).parent / "asyncapi.json").read_text())
    text = json.dumps(document)
    assert all(name in text for name in server.DURABLE_EVENTS)


def test_another_library_version_stops_the_server_unless_allowed(monkeypatch, caplog):
    monkeypatch.setattr(server.adapters, "check_versions",
                        lambda: ["python-socketio 9.9.9 (tested: 5.18.1)"])
    with pytest.raises(ConfigError, match=r"installed python-socketio 9\.9\.9 \(tested: 5\.18\.1\):"
                       r" .*pip install -r requirements\.txt.*--allow-untested-libraries"):
        server.check_libraries(server.Config())
    server.check_libraries(server.Config(allow_untested_libraries=True))
    assert "running with untested python-socketio 9.9.9" in caplog.text


def test_untested_libraries_are_allowed_by_flag_or_environment():
    args = server.parse_args(["--allow-untested-libraries"])
    assert server.load_config(args, {}).allow_untested_libraries is True
    plain = server.parse_args([])
    assert server.load_config(plain, {"ALLOW_UNTESTED_LIBRARIES": "1"}).allow_untested_libraries
    assert not server.load_config(plain, {}).allow_untested_libraries


def test_the_events_of_a_change_that_did_not_commit_are_never_sent(tmp_path):
    """SQLite may roll a transaction back by itself (disk full, I/O error);
    what it logged must not ride out with the next commit."""
    store = server.Storage(tmp_path / "shop.db")
    sent: list = []
    store.on_commit = sent.extend
    try:
        with pytest.raises(RuntimeError), store.transaction() as db:
            store.log_event("message", {"text": "rolled back"}, room="r")
            db.execute("ROLLBACK")             # as SQLite does on its own
            raise RuntimeError("the write failed")
        with store.transaction():
            store.log_event("message", {"text": "kept"}, room="r")
        assert [entry.payload["text"] for entry in sent] == ["kept"]
        assert [entry.payload["text"] for entry in store.log_entries(0, store.last_seq())] \
            == ["kept"]
    finally:
        store.close()


def test_a_logged_event_goes_on_the_wire_as_the_log_wrote_it_with_its_offset():
    """The log's JSON text is sent, not encoded again: the packet is the one
    encoding the payload would give, byte for byte (non-ASCII and line
    separators escaped alike)."""
    payload = {"event": "order:created", "order": {"_id": "x", "items": [{"quantity": 1}],
                                                   "note": "é\u2028😀", "total": 2.5}}
    entry = server.LogEntry(7, "order:created", payload, server.COMPACT_JSON.encode(payload),
                            "u1")
    delivery = server.Delivery.__new__(server.Delivery)
    delivery.log_id = "abcd1234"
    sent = delivery.with_offset(entry)
    assert isinstance(sent, adapters.Encoded)
    assert sent == {**payload, "offset": "abcd1234-0000000000000007"}
    assert adapters.PacketJSON.dumps(["order:created", sent]) \
        == adapters.PacketJSON.encoder.encode(["order:created", dict(sent)])
    assert adapters.PacketJSON.dumps([sent]) == adapters.PacketJSON.encoder.encode([dict(sent)])


def test_a_send_that_fails_is_logged_and_the_rest_of_the_queue_still_goes(tmp_path, caplog):
    """SQLite failing while a notification is marked delivered (a full disk,
    a lock held too long) must not stop delivery: the next events go out and
    the worker can still be woken."""
    shop = server.Shop(server.Config(database=tmp_path / "shop.db"), "x" * 32)
    try:
        sent = []
        shop.tabs["bob"] = 1
        shop.store.mark_delivered = lambda ids: (_ for _ in ()).throw(
            server.sqlite3.OperationalError("disk I/O error"))
        note = server.LogEntry(1, "notification:received", {"id": "n1"}, '{"id":"n1"}', "bob")
        shop.delivery.message_started()
        shop.delivery.committed([note])
        shop.delivery.items.append(lambda: sent.append("next"))
        shop.delivery.message_handled()
        assert sent == ["next"] and not shop.delivery.items
        assert shop.delivery.handling == 0 and shop.delivery.position == 1
        assert "sending notification:received failed" in caplog.text
        assert "disk I/O error" in caplog.text
    finally:
        shop.store.close()


# -- a socket's send queue ------------------------------------------------------

def wait_on(queue: "adapters.SendQueue", timeout_s: float, got: list) -> None:
    """python-engineio's writer: wait for the next packet, give up at Empty."""
    while True:
        try:
            got.append((queue.get(timeout=timeout_s), time.monotonic()))
        except adapters.eventlet.queue.Empty:
            got.append(("empty", time.monotonic()))
            return


def test_a_send_queue_wait_ends_in_empty_a_full_timeout_after_it_began():
    """A wait that follows others still gets its whole timeout: packets 50 ms
    apart for 0.6 s keep a writer with a 0.2 s timeout waiting, and it gives up
    only 0.2 s after the last one."""
    queue, got = adapters.SendQueue(), []
    writer = adapters.eventlet.spawn(wait_on, queue, 0.2, got)
    for n in range(12):
        adapters.eventlet.sleep(0.05)
        queue.put(n)
    last_put = time.monotonic()
    with adapters.eventlet.Timeout(10):
        writer.wait()
    assert [item for item, _ in got] == [*range(12), "empty"]
    assert 0.2 <= got[-1][1] - last_put < 0.5       # its own timeout, not the first's


def test_a_send_queue_arms_one_timer_for_waits_that_follow_one_another(monkeypatch):
    """Not a timer per wait (eventlet's Queue arms and cancels one for each):
    twelve waits within 0.6 s arm the queue's timer a few times, not twelve."""
    hub = adapters.eventlet.hubs.get_hub()
    armed = []
    schedule = hub.schedule_call_global
    monkeypatch.setattr(hub, "schedule_call_global", lambda seconds, callback, *args: (
        armed.append(callback), schedule(seconds, callback, *args))[1])
    queue, got = adapters.SendQueue(), []
    writer = adapters.eventlet.spawn(wait_on, queue, 0.2, got)
    for n in range(12):
        adapters.eventlet.sleep(0.05)
        queue.put(n)
    with adapters.eventlet.Timeout(10):
        writer.wait()
    assert len(got) == 13
    assert 1 <= armed.count(queue.expire) <= 6


def test_a_second_waiter_on_a_send_queue_times_out_too():
    """Two waits at once (a long-polling client sending two GETs) each end in
    Empty: the second has a timer of its own."""
    queue, first, second = adapters.SendQueue(), [], []
    waiters = [adapters.eventlet.spawn(wait_on, queue, 0.1, got) for got in (first, second)]
    with adapters.eventlet.Timeout(10):
        for waiter in waiters:
            waiter.wait()
    assert [item for item, _ in first] == ["empty"] and [item for item, _ in second] == ["empty"]


def test_a_shorter_wait_on_a_send_queue_ends_at_its_own_timeout():
    """A wait with a shorter timeout than the armed timer's is not held to it."""
    queue, got = adapters.SendQueue(), []
    long_wait = adapters.eventlet.spawn(lambda: got.append(queue.get(timeout=5)))
    adapters.eventlet.sleep(0.01)
    queue.put("first")
    with adapters.eventlet.Timeout(10):
        long_wait.wait()
        began = time.monotonic()
        wait_on(queue, 0.1, got)
    assert got[0] == "first" and got[1][0] == "empty"
    assert 0.1 <= got[1][1] - began < 1.0           # not the armed 5 s


def test_the_next_waiter_on_a_send_queue_gets_its_whole_timeout():
    """A socket upgraded from long-polling to websocket: the GET's greenlet
    waits, goes, and the websocket writer waits on the same queue; a waiter
    killed in its wait leaves none behind."""
    queue, got = adapters.SendQueue(), []
    get_request = adapters.eventlet.spawn(queue.get, timeout=0.2)
    adapters.eventlet.sleep(0.1)
    get_request.kill()
    assert queue.waiting is None
    began = time.monotonic()
    writer = adapters.eventlet.spawn(wait_on, queue, 0.2, got)
    with adapters.eventlet.Timeout(10):
        writer.wait()
    assert got[0][0] == "empty" and 0.2 <= got[0][1] - began < 0.5


def test_the_servers_sockets_queue_their_packets_in_a_send_queue(tmp_path):
    shop = server.Shop(server.Config(database=tmp_path / "shop.db"), "x" * 32)
    try:
        assert isinstance(shop.sio.eio.create_queue(), adapters.SendQueue)
    finally:
        shop.store.close()


@pytest.fixture
def engine_socket(tmp_path):
    """An Engine.IO socket of a real server object, its queue a SendQueue."""
    shop = server.Shop(server.Config(database=tmp_path / "shop.db"), "x" * 32)
    yield adapters.engineio.socket.Socket(shop.sio.eio, "sid")
    shop.store.close()


class CountedSends:
    """A socket that counts its sendall calls."""

    def __init__(self, sock) -> None:
        self.sock, self.sendalls = sock, 0

    def sendall(self, data: bytes) -> None:
        self.sendalls += 1
        self.sock.sendall(data)

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


@pytest.fixture
def websocket_pair():
    """make(deflate): a server websocket whose sendall calls are counted, its
    peer's socket, and the frames eventlet itself would send (same extensions)."""
    from eventlet.green import socket as green_socket
    from eventlet.websocket import RFC6455WebSocket
    opened = []

    def make(deflate: bool = False):
        ours, theirs = green_socket.socketpair()
        opened.extend((ours, theirs))
        extensions = {"permessage-deflate": {}} if deflate else None
        ws = RFC6455WebSocket(ours, {}, extensions=extensions)
        ws.socket = CountedSends(ours)
        reference = RFC6455WebSocket(None, {}, extensions=extensions)
        return ws, theirs, reference._pack_message
    yield make
    for sock in opened:
        sock.close()


def received(sock, size: int) -> bytes:
    data = b""
    with adapters.eventlet.Timeout(5):
        while len(data) < size:
            data += sock.recv(size - len(data))
    return data


def test_a_send_queue_tells_the_writer_of_a_batch_that_more_follows(engine_socket):
    """python-engineio's Socket.poll takes every packet waiting; the queue then
    answers more_to_send for each but the last, and only to the greenlet that
    took them."""
    queue = engine_socket.queue
    for n in range(3):
        queue.put(n)
    packets = engine_socket.poll()
    elsewhere = adapters.eventlet.spawn(queue.more_to_send).wait()
    answers = [queue.more_to_send() for _ in packets]
    assert packets == [0, 1, 2] and answers == [True, True, False] and elsewhere is False
    assert queue.more_to_send() is False               # the batch is out
    queue.put(3)
    assert engine_socket.poll() == [3] and queue.more_to_send() is False


@pytest.mark.parametrize("deflate", [False, True])
def test_a_batch_goes_out_on_the_websocket_in_one_sendall(engine_socket, websocket_pair,
                                                          deflate):
    """An ack and the event behind it: two frames, one write; the bytes are
    eventlet's own frames (deflated, if agreed), in order."""
    ws, theirs, frame = websocket_pair(deflate)
    frames = adapters.CheckedFrames(engine_socket.server.sio, ws, "sid", engine_socket.queue)
    batch = ['43[{"ok":true}]', '42["order:created",{"offset":"x"}]', "2"]
    for text in batch:
        engine_socket.queue.put(text)
    for text in engine_socket.poll():                  # python-engineio's writer
        frames.send(text)
    expected = b"".join(frame(text) for text in batch)
    assert ws.socket.sendalls == 1 and received(theirs, len(expected)) == expected
    assert bool(expected[0] & 0x40) is deflate         # RSV1: the frame is compressed
    frames.send("3probe")                              # outside a batch: at once
    probe = frame("3probe")
    assert ws.socket.sendalls == 2 and received(theirs, len(probe)) == probe


def test_the_upgrade_probe_goes_out_at_once_after_a_long_polling_batch(engine_socket,
                                                                       websocket_pair):
    """A client that sends its upgrade on the keep-alive connection of its
    last long-polling GET: the greenlet that took that batch answers the probe."""
    ws, theirs, frame = websocket_pair()
    for text in ("40", '42["presence:online",{}]'):
        engine_socket.queue.put(text)
    assert len(engine_socket.poll()) == 2              # the GET's answer, this greenlet
    frames = adapters.CheckedFrames(engine_socket.server.sio, ws, "sid", engine_socket.queue)
    frames.send("3probe")
    probe = frame("3probe")
    assert ws.socket.sendalls == 1 and received(theirs, len(probe)) == probe


def test_a_send_queue_hands_out_packets_in_order_and_none_ends_the_writer():
    queue, got = adapters.SendQueue(), []
    for item in ("a", "b"):
        queue.put(item)
    assert queue.get(timeout=1) == "a" and queue.get(block=False) == "b"
    writer = adapters.eventlet.spawn(lambda: got.append(queue.get(timeout=5)))
    adapters.eventlet.sleep(0)
    queue.put(None)
    with adapters.eventlet.Timeout(10):
        writer.wait()
    assert got == [None] and queue.waiting is None
