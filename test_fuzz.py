"""Bad input, generated: whatever a client sends, it gets a protocol ack.

For every client event, Hypothesis draws payloads (valid ones, valid ones with
one field spoiled, and anything at all) from the protocol's types and their
edges: finite floats at both ends and subnormals, NaN and Infinity, integers
past 2**63, strings with lone surrogates, NUL and other control characters,
very long strings, deep nesting. Each is sent by a user, an admin or an
anonymous socket of one server over a real socket. Every call must be answered
with an ack that asyncapi.json allows for the event (never `Internal error`), the
connection must stay up, the server must log no traceback, and every event the
sockets receive must be one that asyncapi.json allows.

The same holds for what a client asks the event log with: any query of the
state-on-load routes is a page or `Invalid payload` (a page only for a limit
from 1 to 100), any `auth.serverOffset` connects and gets one `sync` that is
complete only for an offset of this log, and any `since` of joinRoom gets the
history ack or `Invalid payload`.

Derandomized, so a failure reproduces; the examples per event add up to more
than 2,000 in all.
"""

from urllib.parse import quote

import pytest
import requests
import websocket
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import (
    CONTRACT,
    MUG,
    OFFSET,
    POSTER,
    STICKERS,
    TSHIRT,
    WAIT_S,
    ServerProcess,
    Tab,
    make_token,
    new_user_id,
)

EXAMPLES_PER_EVENT = 280
ROOM = "fuzz-room"
PRODUCTS = [TSHIRT, MUG, STICKERS, POSTER]
STATUSES = ["pending", "paid", "shipped", "completed", "cancelled"]

# -- strategies ---------------------------------------------------------------

EDGE_CHARACTERS = ["\x00", "\ud800", "\udbff", "\udc00", "\udfff", "\x01", "\x1f", "\x7f",
                   "\n", "\t", "\u2028", "\ufeff", "\uffff", "é", "😀", "\\", '"', "/", " "]
short_texts = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.sampled_from(EDGE_CHARACTERS), max_size=8),
    st.text(alphabet=st.characters(codec=None), max_size=8),      # surrogates included
)
# Strings around the protocol's bounds (64, 128, 200, 2000), few enough per
# payload to stay below MAX_PAYLOAD_BYTES, which would close the connection.
long_texts = st.builds(lambda c, n: c * n, st.sampled_from(["a", " ", "😀", "\x00"]),
                       st.sampled_from([63, 64, 65, 128, 129, 200, 201, 2000, 2001]))
texts = st.one_of(short_texts, long_texts)
numbers = st.one_of(
    st.integers(-(2 ** 70), 2 ** 70),
    st.integers(-(10 ** 120), 10 ** 120),            # past the 100-digit packet limit too
    st.floats(allow_nan=True, allow_infinity=True),   # subnormals and both ends included
    st.sampled_from([0, 1, -1, 0.1, 0.005, 0.015, 99.995, 1e308, -1e308, 1e300, 5e-324,
                     2.2250738585072014e-308, 2 ** 53 + 1, 2 ** 63, 2 ** 64, 10 ** 20, 1e20]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)


def containers(inner):
    return st.lists(inner, max_size=4) | st.dictionaries(short_texts, inner, max_size=4)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), numbers, short_texts),
                           containers, max_leaves=12)


def deeply_nested(value, depth: int, as_object: bool):
    for _ in range(depth):
        value = {"a": value} if as_object else [value]
    return value


anything = st.one_of(
    json_values,
    st.builds(deeply_nested, scalars, st.integers(20, 300), st.booleans()),
)
ids = st.one_of(st.sampled_from(["someone", "user-1", "demo-user"]), texts)
object_ids = st.one_of(st.sampled_from(PRODUCTS), st.from_regex(r"[0-9a-fA-F]{24}", fullmatch=True),
                       texts)
rooms = st.one_of(st.sampled_from([ROOM, "lobby", "admin", "user:x", "product:1", " pad "]), texts)


def objects(required: dict, optional: dict | None = None):
    return st.fixed_dictionaries(required, optional=optional or {})


def order_items():
    return st.lists(objects({"product": object_ids, "quantity": numbers, "price": numbers}),
                    min_size=1, max_size=3)


def valid_orders():
    """Catalogue orders whose total matches, from which one field may be spoiled."""
    prices = {TSHIRT: 100, MUG: 150, STICKERS: 25, POSTER: 40}
    return st.lists(st.tuples(st.sampled_from(PRODUCTS), st.integers(1, 3)), min_size=1,
                    max_size=3).map(lambda lines: {
                        "items": [{"product": p, "quantity": q, "price": prices[p]}
                                  for p, q in lines],
                        "total": sum(prices[p] * q for p, q in lines)})


meta = st.dictionaries(short_texts, json_values, max_size=4)
PAYLOADS = {
    "joinRoom": st.one_of(rooms, objects({"room": rooms})),
    "leaveRoom": st.one_of(rooms, objects({"room": rooms})),
    "message": objects({"room": st.just(ROOM), "text": texts}, {"meta": meta}),
    "whoami": st.none(),
    "notification:send": objects(
        {"toUserId": ids},
        {"type": st.sampled_from(["info", "warning", "error", "debug"]),
         "priority": st.sampled_from(["low", "normal", "high", "urgent"]),
         "title": texts, "body": texts, "meta": meta}),
    "order:create": st.one_of(
        valid_orders(),
        objects({"items": order_items(), "total": numbers},
                {"shippingAddress": meta, "paymentMethod": texts, "idempotencyKey": texts})),
    "order:updateStatus": objects({"orderId": object_ids, "status": st.sampled_from(STATUSES)}),
    "typing": st.one_of(objects({"toUserId": ids}), objects({"room": st.just(ROOM)})),
}


def paths(value, prefix=()):
    """Every place in a payload where a value stands."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for n, item in enumerate(value):
            yield from paths(item, (*prefix, n))


def spoil(payload, draw):
    """The payload with the value at one place replaced, removed, or added."""
    places = list(paths(payload))
    place = draw(st.sampled_from(places))
    replacement = draw(anything)
    if not place:
        return replacement
    parent = payload
    for step in place[:-1]:
        parent = parent[step]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[place[-1]]
    else:
        parent[place[-1]] = replacement
    if isinstance(parent, dict) and draw(st.booleans()):
        parent[draw(short_texts)] = draw(anything)
    return payload


# -- the server and its clients -----------------------------------------------

@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """One server of its own (orders may be paid, stock taken), a user, an
    admin and an anonymous socket, all in ROOM, and one order to act on."""
    server = ServerProcess(tmp_path_factory.mktemp("fuzz")).start()
    tabs = {"user": Tab(server.url, make_token(new_user_id("fuzz-user"))),
            "admin": Tab(server.url, make_token(new_user_id("fuzz-admin"), "admin")),
            "anonymous": Tab(server.url)}
    for tab in tabs.values():
        assert tab.call("joinRoom", ROOM)["ok"] is True
    order = tabs["user"].call("order:create", {
        "items": [{"product": STICKERS, "quantity": 1, "price": 25}], "total": 25})["order"]
    PAYLOADS["order:updateStatus"] = st.one_of(
        PAYLOADS["order:updateStatus"],
        objects({"orderId": st.just(order["_id"]), "status": st.sampled_from(STATUSES)}))
    yield server, tabs
    for tab in tabs.values():
        tab.close()
    server.stop()


def assert_protocol_ack(event: str, ack) -> None:
    """One of the acks asyncapi.json gives for the event (its error strings are
    the protocol's), and never the one that means a bug."""
    assert ack != {"error": "Internal error"}, ack
    assert CONTRACT.ack_problems(event, ack) == [], (ack, CONTRACT.ack_problems(event, ack))


FUZZ_SETTINGS = settings(max_examples=EXAMPLES_PER_EVENT, derandomize=True, database=None,
                         deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("event", [*PAYLOADS, "unknown"])
@FUZZ_SETTINGS
@given(data=st.data())
def test_every_payload_gets_a_protocol_ack_and_the_connection_survives(fuzzed, event, data):
    server, tabs = fuzzed
    role = data.draw(st.sampled_from(sorted(tabs)), label="sender")
    if event == "unknown":
        event = data.draw(texts.filter(lambda name: name not in PAYLOADS and name not in (
            "connect", "disconnect")), label="event")
        payload = data.draw(anything, label="payload")
    else:
        how = data.draw(st.sampled_from(["valid", "spoiled", "anything"]), label="how")
        payload = data.draw(anything if how == "anything" else PAYLOADS[event], label="payload")
        if how == "spoiled":
            payload = spoil(payload, data.draw)
    logged = server.log_size()
    ack = tabs[role].client.call(event, (payload,), timeout=5)
    assert_protocol_ack(event, ack)
    assert tabs[role].client.connected
    assert not server.log_defects(logged)


def test_the_fuzzed_server_still_answers_everyone(fuzzed):
    """The positive control for the run above: every socket still round-trips."""
    server, tabs = fuzzed
    assert tabs["user"].call("whoami")["role"] == "user"
    assert tabs["admin"].call("whoami")["role"] == "admin"
    assert tabs["anonymous"].call("joinRoom", ROOM) == {"ok": True, "room": ROOM}
    assert server.get_json("/health") == {"ok": True}
    # Every event the three sockets received during the run is one asyncapi.json allows.
    assert [breach for tab in tabs.values() for breach in tab.breaches] == []


# -- frames: whatever arrives on the websocket ---------------------------------------

frames = st.one_of(
    short_texts,
    st.builds(lambda prefix, rest: prefix + rest,
              st.sampled_from(["", "0", "1", "2", "3", "4", "5", "6", "7", "b", "40", "41", "42",
                               "43", "44", "45", "451-", "42/", "4/chat,", "421", "42999"]),
              st.one_of(short_texts, st.sampled_from(['["whoami"]', "[", "{}", '"x"', "[]",
                                                      '{"token": 1}', "\x1e", "\ud800"]))),
)


@settings(max_examples=150, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(frame=frames)
def test_any_text_frame_is_answered_or_closes_that_connection_cleanly(fuzzed, frame):
    """After any text frame (invalid UTF-8 too), the next event is answered or
    the server has closed the connection; only leaving the namespace ("41")
    leaves events unanswered, as in socket.io. The log has no traceback."""
    server, _ = fuzzed
    logged = server.log_size()
    ws = websocket.create_connection(server.url.replace("http", "ws")
                                     + "/socket.io/?EIO=4&transport=websocket", timeout=5)
    left_the_namespace = frame.startswith("41")
    try:
        ws.recv()
        ws.send("40")
        assert ws.recv().startswith("40")
        ws.send(frame.encode("utf-8", "surrogatepass"), websocket.ABNF.OPCODE_TEXT)
        ws.send('4299["whoami"]')     # then an event that must be answered, if still open
        ws.settimeout(1 if left_the_namespace else 5)
        while True:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE or data.startswith(b"4399"):
                break
    except (websocket.WebSocketConnectionClosedException, BrokenPipeError,
            ConnectionResetError):
        pass                          # closed by the server: that is one of the answers
    except websocket.WebSocketTimeoutException:
        assert left_the_namespace, f"{frame!r}: neither answered nor closed"
    finally:
        ws.close()
    assert not server.log_defects(logged)


# -- offsets and page parameters: whatever a client asks with ----------------------------

LOG_EXAMPLES = 80
LOG_SETTINGS = settings(max_examples=LOG_EXAMPLES, derandomize=True, database=None,
                        deadline=None, suppress_health_check=list(HealthCheck))
PAGE_MAX = 100
HISTORY_ROOM = "fuzz-history"
DURABLE = ("order:created", "order:updated", "notification:received", "product:stockUpdated",
           "message")


@pytest.fixture(scope="module")
def logged_shop(fuzzed):
    """On the fuzzed server: a user with orders and notifications, a room
    with messages, and the id of the server's log."""
    server, tabs = fuzzed
    user = new_user_id("fuzz-reader")
    token = make_token(user)
    reader = Tab(server.url, token)
    try:
        for _ in range(3):
            assert reader.call("order:create", {
                "items": [{"product": STICKERS, "quantity": 1, "price": 25}],
                "total": 25})["ok"] is True
    finally:
        reader.close()
    for n in range(3):
        assert tabs["user"].call("notification:send", {"toUserId": user,
                                                       "title": f"fuzz {n}"})["ok"] is True
        assert tabs["user"].call("joinRoom", HISTORY_ROOM)["ok"] is True
        assert tabs["user"].call("message", {"room": HISTORY_ROOM, "text": f"m{n}"})["ok"]
    return server, tabs, token, newest_offset(server).split("-")[0]


def newest_offset(server) -> str:
    response = requests.get(server.url + "/api/products", timeout=WAIT_S)
    assert response.status_code == 200
    return response.headers["X-Log-Offset"]


def seq(offset: str) -> int:
    return int(offset.split("-")[1])


def as_sent(text: str) -> str:
    """A query value as the server reads it: UTF-8, bad bytes replaced."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


# Long values too, few and short enough that a query stays below the 8 KB
# request line of the WSGI server (which answers 414 past it).
query_values = st.one_of(
    short_texts,
    st.builds(lambda c, n: c * n, st.sampled_from(["a", " ", "\x00", "é", "%"]),
              st.sampled_from([63, 64, 65, 100, 101, 200, 201])),
    st.integers(-(2 ** 70), 2 ** 70).map(str),
    st.integers(0, 10 ** 400).map(str),                                  # huge
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "0", "1", "50", "100", "101", "-1", "1e9", "1e2", "1.0", "abc",
                     "0001", "00001", "0100", "00100", "00101", "01000", "000000000050",
                     "pending", "paid", "PAID", "cancelled", " 5", "5 ", "+5", "0x10",
                     "３", "%", "%zz", "&", "=", "9" * 18, "9" * 19, "1" * 40]),
)
# limit, before and status, each present or not (numbers around the page
# bounds are frequent), and any other parameter beside them.
around_the_bounds = st.one_of(
    st.integers(-5, 205).map(str),
    st.builds(lambda zeros, n: "0" * zeros + str(n), st.integers(1, 8), st.integers(0, 2000)))
numbers_mostly = st.integers(0, 3).flatmap(lambda n: query_values if n == 0 else
                                           around_the_bounds)
queries = st.builds(
    lambda known, other: {**other, **known},
    st.fixed_dictionaries({}, optional={"limit": numbers_mostly, "before": numbers_mostly,
                                        "status": query_values}),
    st.dictionaries(short_texts.filter(lambda key: as_sent(key) not in ("limit", "before",
                                                                        "status")),
                    query_values, max_size=2))


def limit_is_valid(value: str | None) -> bool:
    """Absent, or a whole number from 1 to 100, leading zeros and all."""
    return value is None or value.isascii() and value.isdigit() and 1 <= int(value) <= PAGE_MAX


@LOG_SETTINGS
@given(route=st.sampled_from(["/api/orders", "/api/notifications"]), query=queries)
@example(route="/api/orders", query={"limit": "0050"})
@example(route="/api/orders", query={"limit": "00001"})
@example(route="/api/orders", query={"limit": "00101"})
@example(route="/api/notifications", query={"limit": "01000"})
def test_any_page_query_is_answered_200_or_an_invalid_payload_400(logged_shop, route, query):
    """Whatever limit, before and status say, the answer is a page or
    `Invalid payload` with a detail: never a server error. A page comes for a
    limit from 1 to 100 (leading zeros change no number) and holds at most
    that many; with a cursor of digits or none and a status or none, only for
    such a limit."""
    server, _, token, _ = logged_shop
    text = "&".join(f"{quote(key.encode('utf-8', 'surrogatepass'))}="
                    f"{quote(value.encode('utf-8', 'surrogatepass'))}"
                    for key, value in query.items())
    logged = server.log_size()
    response = requests.get(f"{server.url}{route}?{text}", timeout=WAIT_S,
                            headers={"Authorization": token})
    assert response.status_code in (200, 400), (text, response.status_code, response.text)
    body = response.json()
    key = route.rsplit("/", 1)[-1]
    read = {name: as_sent(value) for name, value in query.items()}
    # An empty value may be read as absent or refused: either is an answer.
    blank = any(read.get(name) == "" for name in ("limit", "before", "status"))
    if response.status_code == 400:
        assert set(body) == {"error", "detail"} and body["error"] == "Invalid payload", body
        assert isinstance(body["detail"], str) and body["detail"], body
    else:
        assert set(body) == {key, "offset", "next"} and OFFSET.fullmatch(body["offset"]), body
        assert limit_is_valid(read.get("limit") or None), (text, "a page for a bad limit")
        assert len(body[key]) <= int(read.get("limit") or 50), text
    cursor = read.get("before", "0")
    if not blank and cursor.isascii() and cursor.isdigit() and len(cursor) <= 18 and (
            route.endswith("notifications") or read.get("status") in (None, *STATUSES)):
        assert (response.status_code == 200) == limit_is_valid(read.get("limit")), (text, body)
    assert not server.log_defects(logged)


# Offsets of this log are drawn as where they stand from its newest position
# (the log grows during the run), and resolved against it when sent.
SPOILERS = (str.upper, lambda o: f" {o}", lambda o: f"{o}\n", lambda o: o[:-1],
            lambda o: f"{o}0", lambda o: o.replace("-", "_"), lambda o: f"{o}-{o}")
this_log = st.one_of(st.tuples(st.sampled_from(["from start", "from newest"]),
                               st.sampled_from([0, 1])),
                     st.tuples(st.just("ahead"), st.integers(10 ** 6, 10 ** 15)))
server_offsets = st.one_of(
    st.none(),
    json_values,
    st.from_regex(r"[0-9a-f]{8}-[0-9]{16}", fullmatch=True),            # another log's
    st.tuples(st.just("this log"), this_log),
    st.tuples(st.just("spoiled"), this_log, st.sampled_from(range(len(SPOILERS)))),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "0", "-", "😀"]),
              st.sampled_from([1000, 4000])),                              # huge
    st.builds(lambda n: "0" * n, st.sampled_from([25, 20_000])),
)


def resolved(drawn, log_id: str, newest: int):
    """A drawn value as sent: an offset of this log placed against its newest position."""
    if not isinstance(drawn, tuple):
        return drawn
    (where, n), spoiler = drawn[1], drawn[2] if drawn[0] == "spoiled" else None
    position = {"from start": n, "from newest": max(newest - n, 0), "ahead": newest + n}[where]
    offset = f"{log_id}-{position:016d}"
    return offset if spoiler is None else SPOILERS[spoiler](offset)


def expected_complete(value, log_id: str, newest: int) -> bool | None:
    """True or False as the log must say, None when it may have grown past it."""
    if not isinstance(value, str) or not OFFSET.fullmatch(value) or value[:8] != log_id:
        return False
    if seq(value) <= newest:
        return True
    return False if seq(value) >= newest + 10 ** 6 else None


@LOG_SETTINGS
@given(data=st.data())
def test_any_server_offset_connects_and_gets_one_sync_that_says_if_it_is_complete(logged_shop,
                                                                                  data):
    """A socket connects whatever its auth.serverOffset is; it gets exactly
    one `sync` (none for null), complete only for an offset of this log that
    the log still holds, after exactly the events it replays."""
    server, _, token, log_id = logged_shop
    newest = seq(newest_offset(server))
    value = resolved(data.draw(server_offsets, label="serverOffset"), log_id, newest)
    as_user = data.draw(st.booleans(), label="as_user")
    auth = {"token": token, "serverOffset": value} if as_user else {"serverOffset": value}
    logged = server.log_size()
    tab = Tab(server.url, auth=auth)
    try:
        if value is not None:
            tab.wait_for("sync")
        tab.fence()
        syncs = tab.received("sync")
        assert len(syncs) == (0 if value is None else 1), syncs
        if syncs:
            sync = syncs[0]
            assert OFFSET.fullmatch(sync["offset"]) and sync["offset"][:8] == log_id, sync
            complete = expected_complete(value, log_id, newest)
            if complete is not None:
                assert sync["complete"] is complete, (value, sync)
            with tab.changed:
                names = [name for name, _ in tab.events]
            before_sync = [name for name in names[:names.index("sync")] if name in DURABLE]
            assert len(before_sync) == sync["replayed"], (value, names, sync)
            assert sync["complete"] or sync["replayed"] == 0, sync
        assert tab.breaches == []
    finally:
        tab.close()
    assert not server.log_defects(logged)


def test_the_offset_of_this_log_catches_up_completely(logged_shop):
    """The positive control for the run above: the newest offset of this log
    gets one `sync`, complete, with nothing to replay."""
    server, _, token, log_id = logged_shop
    offset = newest_offset(server)
    tab = Tab(server.url, auth={"token": token, "serverOffset": offset})
    try:
        sync = tab.wait_for("sync")
        assert sync == {"event": "sync", "offset": sync["offset"], "replayed": 0,
                        "complete": True}
        assert sync["offset"] >= offset and sync["offset"].startswith(log_id)
    finally:
        tab.close()


@LOG_SETTINGS
@given(data=st.data())
def test_any_since_of_join_room_is_a_history_ack_or_an_invalid_payload(logged_shop, data):
    """joinRoom with any `since`: a string gets the ack with `replayed` and
    `complete` (complete only for an offset of this log), anything else but
    null `Invalid payload`, never `Internal error`."""
    server, tabs, _, log_id = logged_shop
    newest = seq(newest_offset(server))
    since = resolved(data.draw(server_offsets, label="since"), log_id, newest)
    tab = tabs[data.draw(st.sampled_from(sorted(tabs)), label="who")]
    logged = server.log_size()
    ack = tab.call("joinRoom", {"room": HISTORY_ROOM, "since": since})
    if since is None:
        assert ack == {"ok": True, "room": HISTORY_ROOM}, ack
    elif not isinstance(since, str):
        assert set(ack) == {"error", "detail"} and ack["error"] == "Invalid payload", ack
        assert isinstance(ack["detail"], str), ack
    else:
        assert set(ack) == {"ok", "room", "replayed", "complete"}, ack
        assert ack["ok"] is True and ack["room"] == HISTORY_ROOM, ack
        assert isinstance(ack["replayed"], int) and ack["replayed"] >= 0, ack
        assert isinstance(ack["complete"], bool), ack
        complete = expected_complete(since, log_id, newest)
        if complete is not None:
            assert ack["complete"] is complete, (since, ack)
        if not ack["complete"]:
            assert ack["replayed"] == 0, (since, ack)
    assert tab.client.connected
    assert not server.log_defects(logged)
