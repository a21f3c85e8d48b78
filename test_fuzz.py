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

Derandomized, so a failure reproduces; the examples per event add up to more
than 2,000 in all.
"""

import pytest
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    CONTRACT,
    MUG,
    POSTER,
    STICKERS,
    TSHIRT,
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
