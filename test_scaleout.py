"""Several server.py processes sharing one Redis and one SQLite file behave as one.

Each test starts its own redis-server and two or three server processes; clients
are spread over them and every rule is checked across processes.
"""

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import socketio

from conftest import (
    EXAMPLE_ORDER,
    MUG,
    POSTER,
    SERVER,
    WAIT_S,
    assert_admin_rooms_reach_admins_alone,
    free_port,
    make_token,
    new_user_id,
    one_item_order,
)

# The documented bound for a killed process's users to go offline
# (PRESENCE_TTL_MS + PRESENCE_HEARTBEAT_S in cluster.py), plus slack for the test.
OFFLINE_BOUND_S = 4.0 + 1.0 + 2.0


def statuses(tab, user):
    return [d["status"] for d in tab.received("presence:update") if d["userId"] == user]


def wait_for_users_online(server, count):
    """Until `server`'s /metrics counts `count` users online: the count comes
    from Redis, so by then this process asks Redis and the users' processes
    have shared their connections (users and socket ids go in together)."""
    deadline = time.monotonic() + WAIT_S
    while (online := int(re.search(r"^shop_users_online (\d+)$", server.get("/metrics")[1],
                                   re.MULTILINE)[1])) < count:
        assert time.monotonic() < deadline, f"{online} users online, not {count}, after {WAIT_S}s"
        time.sleep(0.05)


def test_a_room_message_reaches_members_on_every_process(start_cluster, connect):
    a, b, c = start_cluster(3)
    tabs = [connect(new_user_id(), on=server) for server in (a, b, c)]
    for tab in tabs:
        tab.call("joinRoom", "lobby")
        tab.fence()       # its process reads what is published (it subscribes on a first connect)
    for text in ("across", "after"):   # "after" follows: whatever came before it has arrived
        assert tabs[0].call("message", {"room": "lobby", "text": text})["ok"]
    for tab in tabs:
        tab.wait_for("message", lambda d: d["text"] == "after")
    assert [[d["text"] for d in tab.received("message")] for tab in tabs] == \
        [["across", "after"]] * 3


def test_order_created_reaches_admins_on_other_processes_once_per_socket(start_cluster, connect):
    a, b = start_cluster(2)
    admin = new_user_id("admin")
    owner = connect(new_user_id(), on=a)
    admin_tabs = [connect(admin, "admin", on=a), connect(admin, "admin", on=b)]
    # The second order's event follows the first's: once it has arrived, so has the first's.
    orders = [owner.call("order:create", EXAMPLE_ORDER)["order"]["_id"] for _ in range(2)]
    for tab in admin_tabs:
        tab.wait_for("order:created", lambda d: d["order"]["_id"] == orders[1])
    assert [[d["order"]["_id"] for d in tab.received("order:created")] for tab in admin_tabs] \
        == [orders, orders]


def test_admins_on_every_process_are_in_admin_and_admins(start_cluster, connect, redis_server):
    """Another program's emitter (a write-only RedisManager on the same Redis)
    sends to `admin` alone and to `admins` alone: admins' tabs on both
    processes get each, a user's tab gets neither."""
    a, b = start_cluster(2)
    user = new_user_id()
    admins = [connect(new_user_id("admin"), "admin", on=server) for server in (a, b)]
    emitter = socketio.RedisManager(redis_server.url, write_only=True)
    assert_admin_rooms_reach_admins_alone(
        lambda room, data: emitter.emit("typing", data, to=room), admins,
        connect(user, on=b), user)


def test_a_notification_reaches_a_recipient_on_another_process_once(start_cluster, connect):
    a, b = start_cluster(2)
    recipient = new_user_id()
    tab = connect(recipient, on=b)
    sender = connect(new_user_id(), on=a)
    # The second notification follows the first (one queue): once it has arrived, so has
    # every copy of the first.
    ids = [sender.call("notification:send", {"toUserId": recipient})["id"] for _ in range(2)]
    tab.wait_for("notification:received", lambda d: d["id"] == ids[1])
    assert [d["id"] for d in tab.received("notification:received")] == ids


def test_an_offline_recipient_gets_it_when_connecting_to_another_process(start_cluster, connect):
    a, b = start_cluster(2)
    recipient, witness = new_user_id(), new_user_id()
    witness_tab, sender = connect(witness, on=b), connect(new_user_id(), on=a)
    ack = sender.call("notification:send", {"toUserId": recipient})
    # A's notifications are handed out in order: once the next one has reached
    # the witness, the recipient's has been handled while it was offline.
    sender.call("notification:send", {"toUserId": witness})
    witness_tab.wait_for("notification:received")
    tab = connect(recipient, on=b)
    assert tab.wait_for("notification:received")["id"] == ack["id"]


def test_presence_holds_until_the_last_tab_on_any_process_closes(start_cluster, connect):
    a, b, c = start_cluster(3)
    watcher, user = connect(new_user_id(), on=c), new_user_id()
    first = connect(user, on=a)
    watcher.wait_for("presence:update", lambda d: d["userId"] == user)
    second = connect(user, on=b)
    first.close()
    # A has logged the close; what it sends for it (one Redis call later) goes
    # through Redis ahead of the watcher's fence, which starts after that line.
    a.wait_for_log(rf"disconnect sid={first.sid} ")
    watcher.fence()
    assert statuses(watcher, user) == ["online"]
    second.close()
    watcher.wait_for("presence:update", lambda d: d["userId"] == user and d["status"] == "offline")
    watcher.fence()
    assert statuses(watcher, user) == ["online", "offline"]


def test_a_killed_process_users_go_offline_within_the_bound(start_cluster, connect):
    a, b = start_cluster(2)
    watcher = connect(new_user_id(), on=a)
    only_on_b, on_both = new_user_id(), new_user_id()
    connect(only_on_b, on=b)
    connect(on_both, on=b)
    connect(on_both, on=a)
    watcher.wait_for("presence:update", lambda d: d["userId"] == only_on_b)
    b.kill()
    killed = time.monotonic()
    watcher.wait_for("presence:update",
                     lambda d: d["userId"] == only_on_b and d["status"] == "offline",
                     timeout=OFFLINE_BOUND_S)
    assert time.monotonic() - killed <= OFFLINE_BOUND_S
    # A retired B in one heartbeat and announced its offline users one after
    # the other; the watcher's fence, through A and Redis, comes after them all.
    watcher.fence()
    assert statuses(watcher, on_both) == ["online"]


def test_concurrent_payments_for_the_last_unit_on_different_processes(start_cluster, connect):
    servers = start_cluster(3)
    tabs = [connect(new_user_id(), on=servers[n % 3]) for n in range(9)]
    orders = [tab.call("order:create", one_item_order(POSTER, 1, 40))["order"] for tab in tabs]
    barrier, acks = threading.Barrier(len(tabs)), []

    def pay(tab, order):
        barrier.wait()
        acks.append(tab.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"}))

    threads = [threading.Thread(target=pay, args=pair) for pair in zip(tabs, orders, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(1 for ack in acks if ack.get("ok")) == 1
    assert all(ack == {"error": f"Insufficient stock for product {POSTER}"}
               for ack in acks if not ack.get("ok"))
    assert all(server.stock(POSTER) == 0 for server in servers)


def test_rate_limits_are_per_user_across_processes(start_cluster, connect):
    a, b = start_cluster(2, env={"RATE_LIMITS": "typing=3/10s"})
    user = new_user_id()
    on_a, on_b = connect(user, on=a), connect(user, on=b)
    acks = [tab.call("typing", {"toUserId": "x"}) for tab in (on_a, on_b, on_a, on_b)]
    assert [bool(ack.get("ok")) for ack in acks] == [True, True, True, False]
    assert acks[3]["error"] == "Rate limit exceeded" and acks[3]["retryAfterMs"] > 0


def test_a_socket_id_on_another_process_is_a_reserved_room(start_cluster, connect):
    a, b = start_cluster(2)
    victim = connect(new_user_id(), on=b)
    wait_for_users_online(a, 1)
    assert connect(on=a).call("joinRoom", victim.sid) == {"error": "Access denied"}


def test_stock_updates_and_order_updates_cross_processes(start_cluster, connect):
    a, b = start_cluster(2)
    owner, anonymous = connect(new_user_id(), on=a), connect(on=b)
    order = owner.call("order:create", one_item_order(MUG, 2, 150))["order"]
    owner.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"})
    update = anonymous.wait_for("product:stockUpdated")
    assert (update["productId"], update["stock"], update["delta"]) == (MUG, 18, -2)


def test_a_redis_restart_is_survived_and_sharing_resumes(start_cluster, connect, redis_server):
    a, b = start_cluster(2)
    user_a, user_b = new_user_id(), new_user_id()
    tab_a, tab_b = connect(user_a, on=a), connect(user_b, on=b)
    local = connect(new_user_id(), on=a)
    for tab in (tab_a, tab_b, local):
        tab.call("joinRoom", "lobby")

    redis_server.stop()
    assert tab_a.call("whoami")["userId"] == user_a
    assert tab_a.call("message", {"room": "lobby", "text": "still here"})["ok"]
    local.wait_for("message", lambda d: d["text"] == "still here")
    assert a.proc.poll() is None and b.proc.poll() is None
    a.wait_for_log("Redis is unreachable")

    redis_server.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        tab_a.call("message", {"room": "lobby", "text": "are you back?"})
        if any(d["text"] == "are you back?" for d in tab_b.received("message")):
            break
        time.sleep(0.5)
    assert any(d["text"] == "are you back?" for d in tab_b.received("message"))
    a.wait_for_log("Redis is reachable again")   # the next heartbeat, within a second or so
    # Presence was put back (by the heartbeat that logged it): a notification
    # from A finds user_b live on B.
    ack = tab_a.call("notification:send", {"toUserId": user_b, "title": "after"})
    assert tab_b.wait_for("notification:received")["id"] == ack["id"]


def test_redis_url_without_the_redis_package_exits_2(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "redis.py").write_text("raise ImportError('no redis here')\n")
    done = subprocess.run(
        [sys.executable, str(SERVER), "--port", "0", "--db", str(tmp_path / "x.db")],
        env={"PYTHONPATH": str(shadow), "REDIS_URL": "redis://127.0.0.1:1/0",
             "JWT_SECRET": "x" * 32, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "REDIS_URL needs the redis package" in done.stderr


def test_without_redis_url_the_redis_package_is_not_needed(start_server, tmp_path, connect):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "redis.py").write_text("raise ImportError('no redis here')\n")
    server = start_server(env={"PYTHONPATH": str(shadow)})
    user = new_user_id()
    assert connect(user, on=server).call("whoami")["userId"] == user


def test_a_stopping_process_takes_its_users_offline_at_once(start_cluster, connect):
    a, b = start_cluster(2)
    watcher, user = connect(new_user_id(), on=a), new_user_id()
    connect(token=make_token(user), on=b)
    watcher.wait_for("presence:update", lambda d: d["userId"] == user)
    assert b.stop(signal.SIGTERM) == 0
    watcher.wait_for("presence:update", lambda d: d["userId"] == user and d["status"] == "offline",
                     timeout=2)


def test_the_readme_nginx_snippet_balances_polling_and_websocket_clients(start_cluster, connect,
                                                                         tmp_path):
    snippet = (SERVER.parent / "deploy" / "nginx.conf").read_text()
    assert snippet in (SERVER.parent / "README.md").read_text()
    servers = start_cluster(3)
    port = free_port()
    for default, server in zip(("8001", "8002", "8003"), servers, strict=True):
        snippet = snippet.replace(f"127.0.0.1:{default}", server.url.removeprefix("http://"))
    snippet = snippet.replace("listen 8000;", f"listen 127.0.0.1:{port};")
    tmp_path.chmod(0o755)
    (tmp_path / "shop.conf").write_text(snippet)
    (tmp_path / "nginx.conf").write_text(f"""
        daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/nginx-error.log;
        events {{}}
        http {{
            access_log off;
            client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
            fastcgi_temp_path {tmp_path}/fastcgi; uwsgi_temp_path {tmp_path}/uwsgi;
            scgi_temp_path {tmp_path}/scgi;
            include {tmp_path}/shop.conf;
        }}""")
    nginx = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c",
                              str(tmp_path / "nginx.conf"), "-p", str(tmp_path)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        front = f"http://127.0.0.1:{port}"
        polling = connect(new_user_id(), transports=("polling",), url=front)
        upgraded = connect(new_user_id(), transports=("polling", "websocket"), url=front)
        direct = connect(new_user_id(), on=servers[2])
        for tab in (polling, upgraded, direct):
            tab.call("joinRoom", "lobby")
        for n in range(5):   # several polling round trips: each must find its session
            assert polling.call("message", {"room": "lobby", "text": f"poll {n}"})["ok"]
        for tab in (polling, upgraded, direct):
            assert len(tab.wait_count("message", 5)) == 5
        assert upgraded.client.transport() == "websocket"
    finally:
        nginx.terminate()
        nginx.wait(10)
