"""State on load over HTTP, rule by rule, against a real server.py.

GET /api/orders, /api/orders/<id> and /api/notifications answer with what the
caller may see and the log position the answer reflects; a socket that
connects with that position as `auth.serverOffset` then misses nothing and
gets nothing twice. Errors are JSON with the socket's strings; the routes are
read-only and answer the origins CORS_ORIGINS allows, preflight included.
GET /api/products tells its position in the X-Log-Offset header.
"""

import time
from urllib.parse import quote

import pytest
import requests

from conftest import (
    OFFSET,
    STICKERS,
    WAIT_S,
    Tab,
    make_token,
    new_user_id,
    one_item_order,
)

ORDERS, NOTIFICATIONS = "/api/orders", "/api/notifications"
UNKNOWN_ORDER = "64a1b2c3d4e5f6789012ffff"
ROUTES = (ORDERS, f"{ORDERS}/{UNKNOWN_ORDER}", NOTIFICATIONS)
LISTS = (ORDERS, NOTIFICATIONS)
OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256"
NOTIFICATION_KEYS = {"event", "id", "type", "title", "body", "meta", "priority", "from", "ts"}


def api(server, path: str, token: str | None = None, method: str = "GET",
        **headers: str) -> requests.Response:
    if token is not None:
        headers["Authorization"] = token
    return requests.request(method, server.url + path, headers=headers, timeout=WAIT_S)


def answer(server, path: str, token: str) -> dict:
    """The JSON of a 200 answer, whose offset must be one of the log."""
    response = api(server, path, token)
    assert response.status_code == 200, (path, response.status_code, response.text)
    body = response.json()
    assert OFFSET.fullmatch(body["offset"]), body
    return body


def every_page(server, path: str, token: str, limit: int, query: str = "") -> list[list]:
    """Each page of a list, following `next` until it is null (at most 50 pages)."""
    key = path.rsplit("/", 1)[-1]
    pages, before = [], None
    for _ in range(50):
        cursor = "" if before is None else f"&before={quote(before)}"
        body = answer(server, f"{path}?limit={limit}{query}{cursor}", token)
        pages.append(body[key])
        before = body["next"]
        if before is None:
            return pages
        assert isinstance(before, str) and before, body
    raise AssertionError(f"{path}: still a next page after 50")


def ids(items: list[dict]) -> list[str]:
    key = "_id" if items and "_id" in items[0] else "id"
    return [item[key] for item in items]


def create_orders(tab: Tab, count: int) -> list[dict]:
    return [tab.call("order:create", one_item_order())["order"] for _ in range(count)]


def cancel(tab: Tab, order_id: str) -> dict:
    ack = tab.call("order:updateStatus", {"orderId": order_id, "status": "cancelled"})
    assert ack["ok"] is True, ack
    return ack["order"]


def unauthorized(reason: str) -> dict:
    return {"error": "Unauthorized", "reason": reason}


def assert_invalid_payload(response: requests.Response) -> None:
    assert response.status_code == 400, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == "Invalid payload"
    assert isinstance(body["detail"], str) and body["detail"], body


def header_list(response: requests.Response, name: str) -> list[str]:
    return [part.strip().lower() for part in response.headers.get(name, "").split(",")
            if part.strip()]


def preflight(server, path: str, origin: str) -> requests.Response:
    return api(server, path, method="OPTIONS", Origin=origin,
               **{"Access-Control-Request-Method": "GET",
                  "Access-Control-Request-Headers": "authorization"})


def durable(tab: Tab) -> list[tuple[str, dict]]:
    """The events a catch-up is about, in the order they arrived: no presence,
    no fence messages."""
    with tab.changed:
        return [(name, data) for name, data in tab.events
                if name in ("order:created", "order:updated", "notification:received",
                            "product:stockUpdated", "sync")]


def connect_at(connect, token: str | None, offset: str) -> Tab:
    """A socket that catches up from `offset`, once its `sync` has come."""
    auth = {"serverOffset": offset} if token is None else {"token": token,
                                                           "serverOffset": offset}
    tab = connect(auth=auth)
    tab.wait_for("sync")
    return tab


def assert_exactly_replayed(tab: Tab, expected: list[tuple[str, str]]) -> dict:
    """The socket got the events `expected` ((name, order or notification id)),
    each once, in increasing offset order, then `sync` complete with their
    count; the sync's offset is at least the last of theirs."""
    tab.fence()
    events = durable(tab)
    assert [name for name, _ in events] == [name for name, _ in expected] + ["sync"], events
    got = [(name, data["order"]["_id"] if "order" in data else data.get("id", data.get(
        "productId"))) for name, data in events[:-1]]
    assert got == expected, events
    offsets = [data["offset"] for _, data in events[:-1]]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets), offsets
    sync = events[-1][1]
    assert sync == {"event": "sync", "offset": sync["offset"], "replayed": len(expected),
                    "complete": True}, sync
    assert OFFSET.fullmatch(sync["offset"]) and all(o <= sync["offset"] for o in offsets), sync
    return sync


# -- GET /api/orders -------------------------------------------------------------------

def test_orders_are_the_callers_own_newest_first(server, connect):
    alice, bob = new_user_id("alice"), new_user_id("bob")
    alice_tab, bob_tab = connect(alice), connect(bob)
    first, second = create_orders(alice_tab, 2)
    bobs = create_orders(bob_tab, 1)[0]
    body = answer(server, ORDERS, make_token(alice))
    assert set(body) == {"orders", "offset", "next"}
    assert body["orders"] == [second, first]       # the acks' orders, newest first
    assert body["next"] is None
    assert ids(answer(server, ORDERS, make_token(bob))["orders"]) == [bobs["_id"]]
    assert answer(server, ORDERS, make_token(new_user_id("nobody")))["orders"] == []


def test_an_admin_lists_every_users_orders(server, connect):
    alice, bob = new_user_id("alice"), new_user_id("bob")
    alices = create_orders(connect(alice), 1)[0]
    bobs = create_orders(connect(bob), 1)[0]
    listed = ids(answer(server, f"{ORDERS}?limit=100", make_token(new_user_id("admin"),
                                                                  "admin"))["orders"])
    assert listed[:2] == [bobs["_id"], alices["_id"]], listed[:5]
    assert alices["_id"] not in ids(answer(server, ORDERS, make_token(bob))["orders"])


def test_orders_page_through_with_next_newest_first_each_once(server, connect):
    user = new_user_id()
    created = create_orders(connect(user), 7)
    pages = every_page(server, ORDERS, make_token(user), 3)
    assert [len(page) for page in pages] == [3, 3, 1]
    listed = [order for page in pages for order in page]
    assert ids(listed) == ids(created)[::-1]
    assert listed == created[::-1]


def test_a_page_holds_fifty_orders_unless_limit_says_otherwise(server, connect):
    user = new_user_id()
    created = create_orders(connect(user), 51)
    token = make_token(user)
    first = answer(server, ORDERS, token)
    assert ids(first["orders"]) == ids(created)[:0:-1] and first["next"] is not None
    rest = answer(server, f"{ORDERS}?before={quote(first['next'])}", token)
    assert ids(rest["orders"]) == [created[0]["_id"]] and rest["next"] is None
    assert len(answer(server, f"{ORDERS}?limit=1", token)["orders"]) == 1
    assert len(answer(server, f"{ORDERS}?limit=100", token)["orders"]) == 51


def test_the_status_filter_holds_on_every_page(server, connect):
    user = new_user_id()
    tab = connect(user)
    created = create_orders(tab, 7)
    for order in created[::2]:                      # 4 cancelled, 3 pending
        cancel(tab, order["_id"])
    token = make_token(user)
    for status, limit, sizes, wanted in (("cancelled", 3, [3, 1], created[::2]),
                                         ("pending", 2, [2, 1], created[1::2])):
        pages = every_page(server, ORDERS, token, limit, f"&status={status}")
        assert [len(page) for page in pages] == sizes, status
        listed = [order for page in pages for order in page]
        assert {order["status"] for order in listed} == {status}
        assert ids(listed) == ids(wanted)[::-1]
    assert answer(server, f"{ORDERS}?status=shipped", token)["orders"] == []


def test_an_order_that_changes_status_between_two_pages_breaks_nothing(server, connect):
    user = new_user_id()
    tab = connect(user)
    created = create_orders(tab, 5)
    token = make_token(user)
    first = answer(server, f"{ORDERS}?limit=2", token)
    assert ids(first["orders"]) == [created[4]["_id"], created[3]["_id"]]
    cancel(tab, created[4]["_id"])                  # on the page already read
    cancel(tab, created[1]["_id"])                  # on a page still to come
    listed = first["orders"]
    before = first["next"]
    while before is not None:
        body = answer(server, f"{ORDERS}?limit=2&before={quote(before)}", token)
        listed, before = listed + body["orders"], body["next"]
    assert ids(listed) == ids(created)[::-1]
    assert [order["status"] for order in listed] == ["pending"] * 3 + ["cancelled", "pending"]


# -- GET /api/orders/<id> ------------------------------------------------------------

def test_an_order_is_read_by_its_owner_with_the_log_offset(server, connect):
    user = new_user_id()
    order = create_orders(connect(user), 1)[0]
    body = answer(server, f"{ORDERS}/{order['_id']}", make_token(user))
    assert body == {"order": order, "offset": body["offset"]}
    upper = answer(server, f"{ORDERS}/{order['_id'].upper()}", make_token(user))
    assert upper["order"] == order


def test_an_admin_reads_any_users_order(server, connect):
    order = create_orders(connect(new_user_id()), 1)[0]
    body = answer(server, f"{ORDERS}/{order['_id']}", make_token(new_user_id("admin"), "admin"))
    assert body["order"] == order


def test_another_users_order_is_access_denied(server, connect):
    owner, other = new_user_id("owner"), new_user_id("other")
    order = create_orders(connect(owner), 1)[0]
    response = api(server, f"{ORDERS}/{order['_id']}", make_token(other))
    assert (response.status_code, response.json()) == (403, {"error": "Access denied"})
    assert api(server, f"{ORDERS}/{order['_id']}", make_token(owner)).status_code == 200


def test_an_order_that_does_not_exist_is_not_found(server):
    response = api(server, f"{ORDERS}/{UNKNOWN_ORDER}", make_token(new_user_id()))
    assert (response.status_code, response.json()) == (404, {"error": "Order not found"})


@pytest.mark.parametrize("value", ["not-an-id", "64a1b2c3d4e5f6789012345", "", "abc/def",
                                   "64a1b2c3d4e5f67890123456a", "64a1b2c3d4e5f6789012345g",
                                   "é 1", "%41", "€42"])
def test_a_malformed_order_id_is_the_socket_cast_error(server, value):
    """Quoted as the client meant it: the path decoded once, as UTF-8."""
    response = api(server, f"{ORDERS}/{quote(value, safe='/')}", make_token(new_user_id()))
    assert response.status_code == 400, response.text
    error = f'Cast to ObjectId failed for value "{value}" at path "_id"'
    assert response.json() == {"error": error}


# -- GET /api/notifications ------------------------------------------------------------

def test_notifications_are_the_callers_own_newest_first_and_page_with_next(server, connect):
    sender, recipient = new_user_id("sender"), new_user_id("recipient")
    sending = connect(sender)
    sent = []
    for n in range(5):
        ack = sending.call("notification:send", {"toUserId": recipient, "title": f"note {n}",
                                                 "type": "warning", "meta": {"n": n}})
        assert ack["ok"] is True, ack
        sent.append(ack["id"])
    pages = every_page(server, NOTIFICATIONS, make_token(recipient), 2)
    assert [len(page) for page in pages] == [2, 2, 1]
    listed = [note for page in pages for note in page]
    assert ids(listed) == sent[::-1]
    for n, note in zip(range(4, -1, -1), listed):
        assert set(note) == NOTIFICATION_KEYS, note
        assert note | {"id": None, "ts": None} == {
            "event": "notification:received", "id": None, "type": "warning",
            "title": f"note {n}", "body": None, "meta": {"n": n}, "priority": "normal",
            "from": sender, "ts": None}
    for other in (make_token(sender), make_token(recipient + "-else"),
                  make_token(new_user_id("admin"), "admin")):
        assert answer(server, NOTIFICATIONS, other)["notifications"] == []


# -- who may ask ---------------------------------------------------------------------

@pytest.mark.parametrize("path", ROUTES)
def test_no_token_is_unauthorized_no_token(server, path):
    response = api(server, path)
    assert (response.status_code, response.json()) == (401, unauthorized("no token"))
    response = api(server, path, "")                # an empty Authorization header
    assert (response.status_code, response.json()) == (401, unauthorized("no token"))


@pytest.mark.parametrize("path", ROUTES)
def test_an_expired_token_is_unauthorized_token_expired(server, path):
    token = make_token(new_user_id(), exp=int(time.time()) - 3600)
    response = api(server, path, token)
    assert (response.status_code, response.json()) == (401, unauthorized("token expired"))


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("token", [make_token("someone", secret=OTHER_SECRET),
                                   "Bearer not.a.jwt", "Bearer garbage"])
def test_a_token_that_does_not_verify_is_unauthorized_invalid_token(server, path, token):
    response = api(server, path, token)
    assert (response.status_code, response.json()) == (401, unauthorized("invalid token"))


@pytest.mark.parametrize("path", LISTS)
def test_a_token_in_the_query_string_is_ignored(server, path):
    token = make_token(new_user_id())
    for query in (f"?token={quote(token)}", f"?token={make_token('x', bearer=False)}",
                  f"?limit=5&authorization={quote(token)}"):
        response = api(server, path + query)
        assert (response.status_code, response.json()) == (401, unauthorized("no token")), query
    assert api(server, path + "?limit=5", token).status_code == 200     # the same, as a header


@pytest.mark.parametrize("path", LISTS)
def test_the_bearer_prefix_is_optional_and_case_insensitive(server, path):
    user = new_user_id()
    bare = make_token(user, bearer=False)
    for token in (bare, f"bearer {bare}", f"BEARER {bare}", f"Bearer {bare}"):
        assert api(server, path, token).status_code == 200, token


@pytest.mark.parametrize("path", [f"{ORDERS}?limit=0", f"{ORDERS}/not-an-id",
                                  f"{NOTIFICATIONS}?before=garbage", f"{ORDERS}?status=lost"])
def test_unauthorized_is_checked_before_the_request_itself(server, path):
    response = api(server, path)
    assert (response.status_code, response.json()) == (401, unauthorized("no token"))
    response = api(server, path, make_token(new_user_id(), secret=OTHER_SECRET))
    assert (response.status_code, response.json()) == (401, unauthorized("invalid token"))


# -- what may be asked -------------------------------------------------------------------

@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("limit", ["0", "-1", "1e9", "abc", "101", "1000", "99999999999999999999",
                                   "1.5", "+5", " 5", "5 ", "０", "01000", "00101"])
def test_a_limit_that_is_not_from_1_to_100_is_invalid_payload(server, path, limit):
    token = make_token(new_user_id())
    assert_invalid_payload(api(server, f"{path}?limit={quote(limit)}", token))
    assert api(server, f"{path}?limit=100", token).status_code == 200


@pytest.mark.parametrize("limit, size", [("1", 1), ("2", 2), ("100", 3), ("002", 2),
                                         ("0003", 3), ("00001", 1), ("000000000002", 2)])
def test_a_limit_from_1_to_100_gives_a_page_of_at_most_that_many(server, connect, limit, size):
    """Leading zeros change no number."""
    user = new_user_id()
    create_orders(connect(user), 3)
    body = answer(server, f"{ORDERS}?limit={limit}", make_token(user))
    assert len(body["orders"]) == size, body
    assert (body["next"] is None) == (size == 3), body


@pytest.mark.parametrize("status", ["lost", "PAID", "Pending", "paid ", "refunded", "0"])
def test_a_status_that_is_not_a_status_is_invalid_payload(server, status):
    token = make_token(new_user_id())
    assert_invalid_payload(api(server, f"{ORDERS}?status={quote(status)}", token))
    assert api(server, f"{ORDERS}?status=paid", token).status_code == 200


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("before", ["garbage", "-1", "1.5", "1e3", "9" * 40, "0x10",
                                    "3f9a1c2e-0000000000000040"])
def test_a_cursor_that_no_page_gave_is_invalid_payload(server, path, before):
    token = make_token(new_user_id())
    assert_invalid_payload(api(server, f"{path}?before={quote(before)}", token))
    assert api(server, f"{path}?before=1", token).status_code == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ROUTES)
def test_the_state_routes_are_read_only(server, method, path):
    response = api(server, path, make_token(new_user_id()), method)
    assert (response.status_code, response.json()) == (405, {"error": "Method not allowed"})
    assert "get" in header_list(response, "Allow"), response.headers


# -- CORS and the log offset of the catalogue -------------------------------------------

@pytest.mark.parametrize("path", ROUTES)
def test_a_preflight_is_answered_for_any_origin_by_default(server, path):
    response = preflight(server, path, "http://localhost:5173")
    assert response.status_code == 204, response.text
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "get" in header_list(response, "Access-Control-Allow-Methods")
    assert "authorization" in header_list(response, "Access-Control-Allow-Headers")
    answered = api(server, path, make_token(new_user_id()), Origin="http://localhost:5173")
    assert answered.headers["Access-Control-Allow-Origin"] == "*"


def test_a_listed_origin_alone_gets_the_cors_headers(start_server):
    server = start_server(env={"CORS_ORIGINS": "http://localhost:3000"})
    token = make_token(new_user_id())
    for path in ROUTES:
        listed = preflight(server, path, "http://localhost:3000")
        assert listed.status_code == 204, (path, listed.text)
        assert listed.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "origin" in header_list(listed, "Vary")
        assert "get" in header_list(listed, "Access-Control-Allow-Methods")
        assert "authorization" in header_list(listed, "Access-Control-Allow-Headers")
        other = preflight(server, path, "http://localhost:3001")
        assert "Access-Control-Allow-Origin" not in other.headers, (path, other.headers)
        answered = api(server, path, token, Origin="http://localhost:3000")
        assert answered.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "origin" in header_list(answered, "Vary")
        refused = api(server, path, token, Origin="http://localhost:3001")
        assert "Access-Control-Allow-Origin" not in refused.headers, (path, refused.headers)


def test_products_keep_their_array_and_tell_their_log_offset(server):
    response = api(server, "/api/products", Origin="http://localhost:5173")
    assert response.status_code == 200
    products = response.json()
    assert isinstance(products, list) and STICKERS in [p["_id"] for p in products]
    assert OFFSET.fullmatch(response.headers["X-Log-Offset"]), response.headers
    assert "x-log-offset" in header_list(response, "Access-Control-Expose-Headers")


# -- the gapless view --------------------------------------------------------------------

def test_an_orders_offset_gives_a_socket_what_came_after_it_and_nothing_before(server,
                                                                               connect):
    """A change before the answer is in it, one after is replayed, then sync;
    one after the sync arrives live."""
    user = new_user_id()
    token = make_token(user)
    tab = connect(user)
    before = create_orders(tab, 1)[0]
    snapshot = answer(server, ORDERS, token)
    assert ids(snapshot["orders"]) == [before["_id"]]
    after = create_orders(tab, 1)[0]
    caught_up = connect_at(connect, token, snapshot["offset"])
    sync = assert_exactly_replayed(caught_up, [("order:created", after["_id"])])
    assert sync["offset"] > snapshot["offset"]
    live = create_orders(tab, 1)[0]
    arrived = caught_up.wait_for("order:created", lambda data: data["order"]["_id"] == live["_id"])
    assert arrived["offset"] > sync["offset"]
    caught_up.fence()
    assert [data["order"]["_id"] for data in caught_up.received("order:created")] == [
        after["_id"], live["_id"]]


def test_an_orders_offset_that_nothing_followed_replays_nothing(server, connect):
    user = new_user_id()
    create_orders(connect(user), 1)
    snapshot = answer(server, ORDERS, make_token(user))
    sync = assert_exactly_replayed(connect_at(connect, make_token(user), snapshot["offset"]), [])
    assert sync["offset"] == snapshot["offset"]


def test_an_order_offset_gives_a_socket_the_change_after_it(server, connect):
    user = new_user_id()
    token = make_token(user)
    tab = connect(user)
    order = create_orders(tab, 1)[0]
    snapshot = answer(server, f"{ORDERS}/{order['_id']}", token)
    assert snapshot["order"]["status"] == "pending"
    cancel(tab, order["_id"])
    caught_up = connect_at(connect, token, snapshot["offset"])
    assert_exactly_replayed(caught_up, [("order:updated", order["_id"])])
    assert caught_up.received("order:updated")[0]["order"]["status"] == "cancelled"


def test_a_notifications_offset_gives_a_socket_the_notification_after_it(server, connect):
    sender, recipient = new_user_id("sender"), new_user_id("recipient")
    sending, token = connect(sender), make_token(recipient)
    earlier = sending.call("notification:send", {"toUserId": recipient, "title": "earlier"})
    snapshot = answer(server, NOTIFICATIONS, token)
    assert ids(snapshot["notifications"]) == [earlier["id"]]
    later = sending.call("notification:send", {"toUserId": recipient, "title": "later"})
    caught_up = connect_at(connect, token, snapshot["offset"])
    assert_exactly_replayed(caught_up, [("notification:received", later["id"])])
    assert caught_up.received("notification:received")[0]["title"] == "later"


def test_the_products_offset_gives_an_anonymous_socket_the_stock_change_after_it(start_server,
                                                                                 connect):
    """Its own server: orders are paid, so stock moves."""
    server = start_server()
    user = new_user_id()
    tab = connect(user, on=server)
    first, second = create_orders(tab, 2)
    tab.call("order:updateStatus", {"orderId": first["_id"], "status": "paid"})
    response = api(server, "/api/products")
    stock = next(p["stock"] for p in response.json() if p["_id"] == STICKERS)
    assert stock == 499                               # the change before is in the answer
    tab.call("order:updateStatus", {"orderId": second["_id"], "status": "paid"})
    auth = {"serverOffset": response.headers["X-Log-Offset"]}
    caught_up = connect(on=server, auth=auth)
    caught_up.wait_for("sync")
    assert_exactly_replayed(caught_up, [("product:stockUpdated", STICKERS)])
    assert caught_up.received("product:stockUpdated")[0] | {"at": None, "offset": None} == {
        "event": "product:stockUpdated", "productId": STICKERS, "stock": 498, "delta": -1,
        "at": None, "offset": None}
