"""Never miss an update (section 9 of the protocol): offsets on durable
events, order per socket, catch-up on connect, room history with `since`,
retention — on one process, across a restart and a kill -9, and across two
processes sharing Redis. Real servers, real python-socketio clients.
"""

import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import (
    EXAMPLE_ORDER,
    MUG,
    OFFSET,
    SERVER,
    STICKERS,
    WAIT_S,
    Tab,
    logged,
    make_token,
    new_user_id,
    one_item_order,
)

DURABLE = ("order:created", "order:updated", "product:stockUpdated", "notification:received",
           "message")
EPHEMERAL = ("presence:update", "typing", "joined", "left", "sync")


def durable(tab: Tab) -> list[tuple[str, dict]]:
    """The durable events a tab received, in order (a fence's messages left out)."""
    with tab.changed:
        return [(name, data) for name, data in tab.events if name in DURABLE
                and not (name == "message" and str(data.get("room")).startswith("fence-"))]


def greatest_offset(tab: Tab) -> str:
    return max(data["offset"] for _, data in durable(tab))


def newest_offset(server) -> str:
    """The log position of the server now (what /api/products reflects)."""
    return server.get("/api/products")[2]["X-Log-Offset"]


def reconnect(connect, user_id, server_offset, role="user", on=None) -> Tab:
    """A socket that connects with auth.serverOffset, read off the wire in order."""
    token = make_token(user_id, role) if user_id else None
    auth = {"serverOffset": server_offset, **({"token": token} if token else {})}
    return connect(on=on, auth=auth, wire=True)


def events_after(tab: Tab, offset: str) -> list[tuple[str, dict]]:
    return [(name, data) for name, data in durable(tab) if data["offset"] > offset]


def a_little_of_everything(connect, user_id, admin_tab, other_user_id):
    """Orders, a payment (stock moves), a notification, and another user's
    order paid: what happens while somebody is away."""
    user_tab = connect(user_id)
    mine = user_tab.call("order:create", one_item_order(STICKERS, 2))["order"]
    admin_tab.call("order:updateStatus", {"orderId": mine["_id"], "status": "paid"})
    admin_tab.call("notification:send", {"toUserId": user_id, "title": "paid"})
    theirs = connect(other_user_id).call("order:create", one_item_order(MUG, 1, 150))["order"]
    admin_tab.call("order:updateStatus", {"orderId": theirs["_id"], "status": "paid"})
    user_tab.close()
    return mine, theirs


# -- offsets --------------------------------------------------------------------

def test_every_durable_event_carries_an_offset_and_ephemeral_ones_none(connect):
    user = new_user_id()
    tab, admin = connect(user), connect(new_user_id("admin"), "admin")
    room = new_user_id("room")
    tab.call("joinRoom", room)
    admin.call("joinRoom", room)
    tab.call("typing", {"room": room})
    order = tab.call("order:create", one_item_order())["order"]
    admin.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"})
    admin.call("notification:send", {"toUserId": user, "title": "hi"})
    tab.call("message", {"room": room, "text": "hello"})
    for name in DURABLE:
        assert OFFSET.fullmatch(tab.wait_for(name)["offset"]), name
    ephemeral = [admin.wait_for("typing"), tab.wait_for("joined"),
                 tab.wait_for("presence:update")]
    assert all("offset" not in data for data in ephemeral)


def test_offsets_increase_in_commit_order_on_every_socket(connect):
    """A burst of orders from several users at once: every socket receives
    its durable events in increasing offset order, and the offsets are unique."""
    admin = connect(new_user_id("admin"), "admin", wire=True)
    buyers = [connect(new_user_id(), wire=True) for _ in range(4)]

    def buy(tab):
        for _ in range(10):
            assert tab.call("order:create", one_item_order())["ok"]

    threads = [threading.Thread(target=buy, args=(tab,)) for tab in buyers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S * 4)
    assert len(admin.wait_count("order:created", 40)) >= 40
    for tab in (admin, *buyers):
        offsets = [data["offset"] for _, data in durable(tab)]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


def test_the_notification_queue_keeps_log_order_with_orders(connect):
    """Notifications and orders committed one after the other reach their
    recipient in that order."""
    user = new_user_id()
    tab, admin = connect(user, wire=True), connect(new_user_id("admin"), "admin")
    for n in range(15):
        admin.call("notification:send", {"toUserId": user, "title": f"#{n}"})
        tab.call("order:create", one_item_order())
    tab.wait_count("notification:received", 15)
    tab.wait_count("order:created", 15)
    names = [name for name, _ in durable(tab)]
    offsets = [data["offset"] for _, data in durable(tab)]
    assert names == ["notification:received", "order:created"] * 15
    assert offsets == sorted(offsets)


# -- catch-up on connect ---------------------------------------------------------

def test_catch_up_is_exactly_what_a_second_tab_saw_live_then_sync(connect, server):
    user = new_user_id()
    admin = connect(new_user_id("admin"), "admin")
    watcher = connect(user, wire=True)            # the tab that stays
    away = connect(user)
    away.call("order:create", one_item_order())
    away.wait_for("order:created")
    offset = greatest_offset(away)
    away.close()
    a_little_of_everything(connect, user, admin, new_user_id())
    watcher.fence()
    missed = events_after(watcher, offset)
    assert {name for name, _ in missed} == {"order:created", "order:updated",
                                           "product:stockUpdated", "notification:received"}
    back = reconnect(connect, user, offset)
    sync = back.wait_for("sync")
    assert durable(back) == missed
    assert sync == {"event": "sync", "offset": newest_offset(server),
                    "replayed": len(missed), "complete": True}
    assert [n for n, _ in back.events if n in DURABLE or n == "sync"][-1] == "sync"


def test_an_admin_catches_up_on_every_order(connect, server):
    admin_id = new_user_id("admin")
    offset = newest_offset(server)
    users = [new_user_id() for _ in range(3)]
    orders = [connect(u).call("order:create", one_item_order())["order"]["_id"] for u in users]
    back = reconnect(connect, admin_id, offset, role="admin")
    back.wait_for("sync")
    assert [d["order"]["_id"] for d in back.received("order:created")
            if d["order"]["_id"] in orders] == orders


def test_another_users_events_are_never_replayed(connect, server):
    user, stranger = new_user_id(), new_user_id()
    offset = newest_offset(server)
    admin = connect(new_user_id("admin"), "admin")
    theirs = connect(stranger).call("order:create", one_item_order())["order"]
    admin.call("notification:send", {"toUserId": stranger, "title": "not yours"})
    admin.call("order:updateStatus", {"orderId": theirs["_id"], "status": "cancelled"})
    mine = connect(user).call("order:create", one_item_order())["order"]
    back = reconnect(connect, user, offset)
    sync = back.wait_for("sync")
    got = durable(back)
    assert [d["order"]["_id"] for n, d in got if n.startswith("order:")] == [mine["_id"]]
    assert back.received("notification:received") == []
    assert sync["replayed"] == len(got) and sync["complete"] is True


def test_no_event_twice_when_orders_commit_during_the_catch_up(connect, server):
    """Orders keep coming while an admin reconnects: it gets each one once,
    in offset order, whether it came in the catch-up or live."""
    admin_id = new_user_id("admin")
    offset = newest_offset(server)
    buyer = connect(new_user_id())
    created, stop = [], threading.Event()

    def buy():
        while not stop.is_set() and len(created) < 200:
            created.append(buyer.call("order:create", one_item_order())["order"]["_id"])

    thread = threading.Thread(target=buy)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while len(created) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        tabs = [reconnect(connect, admin_id, offset, role="admin") for _ in range(3)]
    finally:
        stop.set()
        thread.join(WAIT_S * 4)
    for tab in tabs:
        tab.wait_for("sync")
        tab.wait_for("order:created", lambda d: d["order"]["_id"] == created[-1])
        ids = [d["order"]["_id"] for n, d in durable(tab) if n == "order:created"]
        assert ids == created, "each order once, in order"
        offsets = [d["offset"] for _, d in durable(tab)]
        assert offsets == sorted(offsets)


def test_catch_up_survives_a_restart(start_server, connect):
    server = start_server()
    user = new_user_id()
    admin = connect(new_user_id("admin"), "admin", on=server)
    tab = connect(user, on=server)
    order = tab.call("order:create", one_item_order())["order"]
    tab.wait_for("order:created")
    offset = greatest_offset(tab)
    tab.close()
    admin.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"})
    admin.call("notification:send", {"toUserId": user, "title": "while you were away"})
    admin.close()
    server.stop()
    server.start()
    back = reconnect(connect, user, offset, on=server)
    sync = back.wait_for("sync")
    assert [n for n, _ in durable(back)] == ["order:updated", "product:stockUpdated",
                                            "notification:received"]
    assert back.received("order:updated")[0]["order"]["status"] == "paid"
    assert sync["complete"] is True and sync["replayed"] == 3


def test_every_acked_order_survives_kill_9_and_reaches_a_reconnecting_client(start_server,
                                                                             connect):
    server = start_server()
    offset = newest_offset(server)
    buyer = connect(new_user_id(), on=server)
    acked, stop = [], threading.Event()

    def buy():
        while not stop.is_set():
            try:
                acked.append(buyer.call("order:create", one_item_order(), timeout=2)["order"])
            except Exception:  # noqa: BLE001 - the server is gone mid-call: never acked
                return

    thread = threading.Thread(target=buy)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while len(acked) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()
    stop.set()
    thread.join(WAIT_S)
    assert len(acked) >= 20
    server.start()
    back = reconnect(connect, None, offset, on=server)
    admin = reconnect(connect, new_user_id("admin"), offset, role="admin", on=server)
    sync = admin.wait_for("sync")
    replayed = [d["order"]["_id"] for d in admin.received("order:created")]
    assert [order["_id"] for order in acked] == replayed[:len(acked)]
    assert sync["complete"] is True
    assert back.wait_for("sync")["complete"] is True


@pytest.mark.parametrize("server_offset", [
    "", "x", "garbage-offset", "0" * 10_000, "abcdef01-0000000000000001", 42, 1.5, True,
    ["a"], {"o": 1}, "ABCDEF01-0000000000000001 "])
def test_an_offset_that_is_not_one_of_this_log_gets_sync_complete_false(connect, server,
                                                                         server_offset):
    tab = reconnect(connect, new_user_id(), server_offset)
    sync = tab.wait_for("sync")
    assert sync["complete"] is False and sync["replayed"] == 0
    assert OFFSET.fullmatch(sync["offset"])
    tab.fence()
    assert durable(tab) == [] and len(tab.received("sync")) == 1


def test_an_offset_ahead_of_the_log_gets_sync_complete_false(connect, server):
    log_id, seq = newest_offset(server).split("-")
    tab = reconnect(connect, new_user_id(), f"{log_id}-{int(seq) + 1000:016d}")
    assert tab.wait_for("sync")["complete"] is False


def test_a_null_or_absent_server_offset_changes_nothing(connect):
    """The positive control: a socket with an offset gets its `sync`, after
    which the ones without have had time to get theirs, were there one."""
    without, null = connect(new_user_id()), reconnect(connect, new_user_id(), None)
    control = reconnect(connect, new_user_id(), "x")
    control.wait_for("sync")
    for tab in (without, null):
        tab.fence()
        assert tab.received("sync") == []


def test_an_offset_from_another_database_or_before_a_reset_is_unknown(start_server, connect,
                                                                      tmp_path):
    first = start_server()
    other = start_server(db=tmp_path / "other.db")
    foreign = newest_offset(other)
    user = new_user_id()
    tab = connect(user, on=first)
    tab.call("order:create", one_item_order())
    before_reset = tab.wait_for("order:created")["offset"]
    tab.close()
    assert reconnect(connect, user, foreign, on=first).wait_for("sync")["complete"] is False
    first.stop()
    subprocess.run([sys.executable, str(SERVER), "reset", "--db", str(first.db)], check=True,
                   capture_output=True, timeout=30)
    first.start()
    sync = reconnect(connect, user, before_reset, on=first).wait_for("sync")
    assert sync["complete"] is False and sync["offset"].split("-")[0] != \
        before_reset.split("-")[0]


def test_anonymous_sockets_catch_up_on_stock_alone(connect, server):
    offset = newest_offset(server)
    user = new_user_id()
    admin = connect(new_user_id("admin"), "admin")
    order = connect(user).call("order:create", one_item_order())["order"]
    admin.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"})
    anonymous = reconnect(connect, None, offset)
    sync = anonymous.wait_for("sync")
    names = {name for name, _ in durable(anonymous)}
    assert names == {"product:stockUpdated"} and sync["replayed"] >= 1


def test_catch_up_marks_notifications_delivered_so_none_comes_twice(connect, server):
    user = new_user_id()
    offset = newest_offset(server)
    sender = connect(new_user_id())
    note = sender.call("notification:send", {"toUserId": user, "title": "once"})["id"]
    caught_up = reconnect(connect, user, offset)
    caught_up.wait_for("sync")
    assert [d["id"] for d in caught_up.received("notification:received")] == [note]
    later = connect(user)        # without an offset: undelivered ones would come now
    control = sender.call("notification:send", {"toUserId": user, "title": "control"})["id"]
    later.wait_for("notification:received", lambda d: d["id"] == control)
    assert [d["id"] for d in later.received("notification:received")] == [control]


def test_without_an_offset_undelivered_notifications_still_come_on_connect(connect):
    user = new_user_id()
    sender = connect(new_user_id())
    note = sender.call("notification:send", {"toUserId": user, "title": "kept"})["id"]
    got = connect(user).wait_for("notification:received")
    assert got["id"] == note and OFFSET.fullmatch(got["offset"])


# -- rooms ---------------------------------------------------------------------

def test_join_room_with_since_replays_the_rooms_messages_after_it_in_order(connect):
    room = new_user_id("room")
    talker, reader = connect(new_user_id()), connect(new_user_id(), wire=True)
    talker.call("joinRoom", room)
    reader.call("joinRoom", room)
    talker.call("message", {"room": room, "text": "seen"})
    since = reader.wait_for("message", lambda d: d["text"] == "seen")["offset"]
    reader.call("leaveRoom", room)
    for n in range(5):
        talker.call("message", {"room": room, "text": f"missed {n}"})
    other_room = new_user_id("room")
    talker.call("joinRoom", other_room)
    talker.call("message", {"room": other_room, "text": "elsewhere"})
    ack = reader.call("joinRoom", {"room": room, "since": since})
    assert ack == {"ok": True, "room": room, "replayed": 5, "complete": True}
    talker.call("message", {"room": room, "text": "live"})
    reader.wait_for("message", lambda d: d["text"] == "live")
    texts = [d["text"] for d in reader.received("message")]
    assert texts == ["seen", *[f"missed {n}" for n in range(5)], "live"]
    offsets = [d["offset"] for d in reader.received("message")]
    assert offsets == sorted(offsets)


def test_join_room_with_since_of_another_log_replays_nothing(connect):
    room = new_user_id("room")
    talker = connect(new_user_id())
    talker.call("joinRoom", room)
    talker.call("message", {"room": room, "text": "before"})
    reader = connect(new_user_id())
    ack = reader.call("joinRoom", {"room": room, "since": "00000000-0000000000000000"})
    assert ack == {"ok": True, "room": room, "replayed": 0, "complete": False}
    reader.fence()
    assert reader.received("message") == []


@pytest.mark.parametrize("since", [5, True, ["x"], {"a": 1}])
def test_join_room_since_that_is_not_a_string_is_invalid(connect, since):
    ack = connect(new_user_id()).call("joinRoom", {"room": "lobby", "since": since})
    assert ack == {"error": "Invalid payload", "detail": "since must be an offset (a string)"}


def test_join_room_without_since_acks_as_before(connect):
    room = new_user_id("room")
    assert connect(new_user_id()).call("joinRoom", {"room": room}) == {"ok": True, "room": room}


# -- retention -------------------------------------------------------------------

def test_retention_prunes_old_events_and_their_offsets_become_incomplete(start_server, connect):
    """The newest event is always kept (the next position follows it): two
    old messages, of which the first is pruned."""
    server = start_server(env={"EVENT_RETENTION": "1s"})
    user = new_user_id()
    room = new_user_id("room")
    tab = connect(user, on=server)
    tab.call("joinRoom", room)
    for text in ("old", "newest"):
        tab.call("message", {"room": room, "text": text})
    old = tab.wait_for("message", lambda d: d["text"] == "old")["offset"]
    newest = tab.wait_for("message", lambda d: d["text"] == "newest")["offset"]
    assert log_size(server) == 2
    deadline = time.monotonic() + WAIT_S
    while log_size(server) > 1:
        assert time.monotonic() < deadline, "the log was not pruned"
        time.sleep(0.1)
    tab.call("message", {"room": room, "text": "kept"})
    tab.wait_for("message", lambda d: d["text"] == "kept")
    before_old = f"{old.split('-')[0]}-{0:016d}"       # "old" came after it, and is gone
    sync = reconnect(connect, user, before_old, on=server).wait_for("sync")
    assert sync["complete"] is False and sync["replayed"] == 0
    reader = connect(new_user_id(), on=server)
    ack = reader.call("joinRoom", {"room": room, "since": before_old})
    assert ack["complete"] is False and 1 <= ack["replayed"] <= 2
    reader.wait_for("message", lambda d: d["text"] == "kept")
    assert "old" not in [d["text"] for d in reader.received("message")]
    # Everything after the newest of the two is still kept: that offset is complete.
    assert reconnect(connect, user, newest, on=server).wait_for("sync")["complete"] is True


def log_size(server) -> int:
    return int(re.search(r"^shop_event_log_events (\d+)$", server.get("/metrics")[1],
                         re.MULTILINE)[1])


# -- several processes ---------------------------------------------------------------

def test_catch_up_across_processes_both_ways(start_cluster, connect):
    a, b = start_cluster(2)
    for away_on, busy_on in ((a, b), (b, a)):
        user = new_user_id()
        tab = connect(user, on=away_on)
        tab.call("order:create", one_item_order())
        offset = tab.wait_for("order:created")["offset"]
        tab.close()
        admin = connect(new_user_id("admin"), "admin", on=busy_on)
        order = connect(user, on=busy_on).call("order:create", EXAMPLE_ORDER)["order"]
        admin.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"})
        back = reconnect(connect, user, offset, on=away_on)
        sync = back.wait_for("sync")
        assert [n for n, _ in durable(back)] == ["order:created", "order:updated",
                                                "product:stockUpdated", "product:stockUpdated"]
        assert sync == {"event": "sync", "offset": durable(back)[-1][1]["offset"],
                        "replayed": 4, "complete": True}


def test_two_processes_under_a_burst_deliver_in_log_order(start_cluster, connect):
    a, b = start_cluster(2)
    admins = [connect(new_user_id("admin"), "admin", on=server, wire=True) for server in (a, b)]
    buyers = [connect(new_user_id(), on=server) for server in (a, b, a, b)]
    created = []

    def buy(tab):
        for _ in range(15):
            created.append(tab.call("order:create", one_item_order())["order"]["_id"])

    threads = [threading.Thread(target=buy, args=(tab,)) for tab in buyers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S * 4)
    assert len(created) == 60
    for admin in admins:
        for order_id in created:
            admin.wait_for("order:created", lambda d, i=order_id: d["order"]["_id"] == i)
        offsets = [logged(d) and d["offset"] for d in admin.received("order:created")]
        assert len(offsets) == 60 and offsets == sorted(offsets) and len(set(offsets)) == 60
    orders = [[d["order"]["_id"] for d in admin.received("order:created")] for admin in admins]
    assert orders[0] == orders[1], "both processes send the log in one order"
