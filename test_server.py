"""The protocol, rule by rule, against a real server.py over real sockets.

Sections follow the protocol: running it, connecting and identity, acks and
errors, each event, storage, limits.
"""

import base64
import itertools
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import urllib.request

import jwt
import pytest
import requests
import socketio
import websocket

from conftest import (
    EXAMPLE_ORDER,
    MUG,
    POSTER,
    SECRET,
    SERVER,
    STICKERS,
    TSHIRT,
    assert_admin_rooms_reach_admins_alone,
    logged,
    make_token,
    new_user_id,
    one_item_order,
)

ISO = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(SERVER), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=30, check=False)


def raw_socket(server, connect_packet: str | None = "40"):
    """A bare websocket, past the Engine.IO open (and the Socket.IO CONNECT)."""
    ws = websocket.create_connection(server.url.replace("http", "ws")
                                     + "/socket.io/?EIO=4&transport=websocket", timeout=5)
    assert ws.recv().startswith("0")
    if connect_packet is not None:
        ws.send(connect_packet)
        assert ws.recv().startswith("40")
    return ws


def close_frame(ws, timeout: float = 5) -> tuple[int | None, str, list]:
    """Read until the server's close frame: (code, reason, frames before it)."""
    ws.settimeout(timeout)
    frames = []
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            return code, data[2:].decode(), frames
        frames.append(data.decode() if opcode == websocket.ABNF.OPCODE_TEXT else data)


def frames_in_order(server, token: str, *steps: tuple[list | str, tuple[str, ...]]) -> list[str]:
    """Over a bare websocket, send each step's event (a list, or its JSON text;
    ack ids 1, 2, ...) once the frames its predecessor waited for have come, and
    return every frame after the connection's, in the order they arrived."""
    ws = raw_socket(server, "40" + json.dumps({"token": token}))
    try:
        frames: list[str] = []
        for ack_id, (event, until) in enumerate(steps, start=1):
            ws.send(f"42{ack_id}" + (event if isinstance(event, str) else json.dumps(event)))
            while not all(any(f.startswith(prefix) for f in frames) for prefix in until):
                frames.append(ws.recv())
        return frames
    finally:
        ws.close()


def first_index(frames: list[str], prefix: str) -> int:
    return next(n for n, frame in enumerate(frames) if frame.startswith(prefix))


# =============================================================================
# 1. Running it
# =============================================================================

def test_first_start_creates_the_database_and_seeds_the_demo_catalogue(start_server):
    server = start_server()
    assert server.get_json("/api/products") == [
        {"_id": TSHIRT, "name": "Demo T-shirt", "price": 100, "stock": 50},
        {"_id": MUG, "name": "Demo Mug", "price": 150, "stock": 20},
        {"_id": STICKERS, "name": "Demo Sticker pack", "price": 25, "stock": 500},
        {"_id": POSTER, "name": "Limited Poster", "price": 40, "stock": 1},
    ]


def test_host_flag_sets_the_bind_address(start_server):
    server = start_server(args=("--host", "127.0.0.2"))
    assert server.url.startswith("http://127.0.0.2:")
    assert server.get_json("/health") == {"ok": True}


def test_health_route(server):
    status, body, headers = server.get("/health")
    assert (status, json.loads(body)) == (200, {"ok": True})
    assert headers["Content-Type"] == "application/json"


def test_root_serves_a_page(server):
    status, body, headers = server.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "<html" in body.lower() or "<!doctype html" in body.lower()


def test_http_routes_follow_cors_origins(start_server):
    server = start_server(env={"CORS_ORIGINS": "http://shop.test, http://admin.test"})
    for origin, allowed in [("http://shop.test", "http://shop.test"), ("http://evil.test", None)]:
        request = urllib.request.Request(server.url + "/api/products", headers={"Origin": origin})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers.get("Access-Control-Allow-Origin") == allowed
    assert requests.get(server.url + "/socket.io/?EIO=4&transport=polling",
                        headers={"Origin": "http://evil.test"}, timeout=5).status_code == 400
    assert requests.get(server.url + "/socket.io/?EIO=4&transport=polling",
                        headers={"Origin": "http://shop.test"}, timeout=5).status_code == 200


def test_unknown_path_is_404_json(server):
    status, body, _ = server.get("/nope")
    assert (status, json.loads(body)) == (404, {"error": "Not found"})


def test_metrics_route_counts_connections_events_errors_and_latency(server, connect):
    tab = connect(new_user_id())
    tab.call("whoami")
    tab.call("joinRoom", "admin")
    status, body, headers = server.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    values = dict(line.rsplit(" ", 1) for line in body.splitlines() if not line.startswith("#"))
    assert int(values["shop_connections"]) >= 1
    assert int(values["shop_users_online"]) >= 1
    assert int(values['shop_events_total{event="whoami"}']) >= 1
    assert int(values['shop_event_errors_total{event="joinRoom"}']) >= 1
    assert int(values['shop_ack_latency_seconds_bucket{le="+Inf"}']) == int(
        values["shop_ack_latency_seconds_count"]) >= 2


def test_dev_secret_is_created_once_with_mode_0600_and_demo_tokens_are_printed(start_server,
                                                                                tmp_path, connect):
    server = start_server(env={"JWT_SECRET": None})
    secret_file = tmp_path / "shop.db.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip()
    tokens = dict(line.split(": ", 1) for line in server.stdout().splitlines() if "demo " in line)
    user_token = tokens["  demo user "]
    claims = jwt.decode(user_token.removeprefix("Bearer "), secret, algorithms=["HS256"])
    assert claims["sub"] == "demo-user" and claims["role"] == "user"
    admin_tab = connect(token=tokens["  demo admin"], on=server)
    assert admin_tab.call("whoami")["role"] == "admin"
    admin_tab.close()
    server.stop()
    start_server(env={"JWT_SECRET": None})
    assert secret_file.read_text().strip() == secret


def test_token_command_prints_a_bearer_token_signed_with_the_server_secret(start_server,
                                                                           tmp_path, connect):
    db = tmp_path / "cli.db"
    server = start_server(env={"JWT_SECRET": None}, db=db)
    done = run_cli("token", "alice", "--role", "admin", "--email", "a@example.com",
                   "--name", "Alice", "--ttl", "30m", "--db", str(db), env={"JWT_SECRET": ""})
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("Bearer ")
    tab = connect(token=token, on=server)
    assert tab.call("whoami") == {"userId": "alice", "role": "admin", "email": "a@example.com",
                                  "isVerified": False}
    claims = jwt.decode(token[7:], options={"verify_signature": False})
    assert 1790 <= claims["exp"] - claims["iat"] <= 1810


def test_token_command_uses_jwt_secret_when_set():
    done = run_cli("token", "bob", env={"JWT_SECRET": SECRET})
    claims = jwt.decode(done.stdout.strip()[7:], SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob" and claims["role"] == "user"


def test_a_taken_port_stops_a_second_server_with_exit_2_while_the_first_serves(start_server,
                                                                              tmp_path, connect):
    first = start_server()
    port = first.url.rsplit(":", 1)[1]
    second = run_cli("--port", port, "--db", str(tmp_path / "second.db"),
                     env={"JWT_SECRET": SECRET})
    assert second.returncode == 2
    assert second.stderr.strip() == (f"server.py: error: port {port} is already in use on"
                                     " 127.0.0.1 (another server.py?): stop it, or choose"
                                     " another with --port")
    assert connect(on=first).call("joinRoom", "still-mine")["ok"] is True


def test_the_banner_says_how_to_stop_and_how_long_demo_tokens_last(start_server):
    banner = start_server(env={"JWT_SECRET": None}).stdout()
    assert "Ctrl-C to stop." in banner and "(valid 24h; more with python server.py token USER" \
        in banner
    banner = start_server().stdout()
    assert "Tokens: python server.py token USER (with the same JWT_SECRET)" in banner
    assert "demo user" not in banner


def test_listening_on_all_addresses_prints_urls_one_can_open(start_server):
    server = start_server(args=("--host", "0.0.0.0"))
    assert "listening on all addresses" in server.stdout()
    assert server.url.startswith("http://127.0.0.1:")
    assert server.get_json("/health") == {"ok": True}


def test_an_ipv6_loopback_host_works(start_server, connect):
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6; the test needs ::1")
    server = start_server(args=("--host", "::1"))
    assert server.url.startswith("http://[::1]:")
    assert server.get_json("/health") == {"ok": True}
    assert connect(new_user_id(), on=server).call("whoami")["role"] == "user"


def test_help_lists_the_environment_variables():
    done = run_cli("--help")
    assert done.returncode == 0
    for name in ("JWT_SECRET", "ALLOWED_HOSTS", "RATE_LIMITS", "MAX_PAYLOAD_BYTES",
                 "CONNECT_TIMEOUT", "REDIS_URL", "CORS_ORIGINS", "ADMIN_UI", "NOTIFY_QUEUE"):
        assert name in done.stdout, name


def test_reset_brings_back_the_seeded_catalogue_and_removes_orders_notifications_and_users(
        start_server, tmp_path, connect):
    db = tmp_path / "workshop.db"
    server = start_server(db=db)
    buyer, offline = new_user_id(), new_user_id()
    tab = connect(buyer, on=server)
    order = tab.call("order:create", {"items": [{"product": MUG, "quantity": 3, "price": 150}],
                                      "total": 450})["order"]
    assert tab.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"})["ok"]
    assert tab.call("notification:send", {"toUserId": offline, "title": "before"})["ok"]
    assert server.stock(MUG) == 17
    tab.close()
    server.stop()

    done = run_cli("reset", "--db", str(db))
    assert done.returncode == 0, done.stderr
    assert "removed 1 orders, 1 notifications and 1 users" in done.stdout

    server = start_server(db=db)
    assert {p["_id"]: (p["price"], p["stock"]) for p in server.get_json("/api/products")} == {
        TSHIRT: (100, 50), MUG: (150, 20), STICKERS: (25, 500), POSTER: (40, 1)}
    tab = connect(buyer, on=server)
    assert tab.call("order:updateStatus", {"orderId": order["_id"], "status": "cancelled"}) == {
        "error": "Order not found"}
    # The notification saved before the reset is gone: the recipient gets only the new one.
    assert tab.call("notification:send", {"toUserId": offline, "title": "after"})["ok"]
    recipient = connect(offline, on=server)
    assert recipient.wait_for("notification:received")["title"] == "after"
    recipient.fence()
    assert [n["title"] for n in recipient.received("notification:received")] == ["after"]
    rows = sqlite3.connect(db).execute("SELECT count(*) FROM users").fetchone()[0]
    assert rows == 2   # the two who connected after the reset


def test_reset_refuses_while_a_server_runs_on_the_file(start_server, tmp_path):
    db = tmp_path / "busy.db"
    server = start_server(db=db)
    done = run_cli("reset", "--db", str(db))
    assert done.returncode == 2
    assert f"a server is running on {db}: stop it (Ctrl-C), then run this again" in done.stderr
    server.stop()
    assert run_cli("reset", "--db", str(db)).returncode == 0   # the positive control


def test_token_says_on_stderr_which_secret_signed_it(start_server, tmp_path, connect):
    db = tmp_path / "elsewhere.db"
    server = start_server(env={"JWT_SECRET": None}, db=db)
    done = run_cli("token", "alice", "--db", str(db), cwd=tmp_path.parent,
                   env={"JWT_SECRET": ""})
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == (f"signed with the dev secret {db}.secret, which a server"
                                   f" started with --db {db} uses")
    assert connect(token=done.stdout.strip(), on=server).call("whoami")["userId"] == "alice"


def test_token_never_makes_a_dev_secret_that_no_server_uses(tmp_path):
    done = run_cli("token", "alice", cwd=tmp_path, env={"JWT_SECRET": ""})
    assert done.returncode == 2 and done.stdout == ""
    assert f"no dev secret at {tmp_path / 'app.db.secret'}" in done.stderr
    assert "set JWT_SECRET" in done.stderr
    assert not (tmp_path / "app.db.secret").exists()


# Every bad setting's message is a unit test (test_units.py); these check the
# process: exit code 2 and one line on stderr, from a flag, a variable, a file.
@pytest.mark.parametrize("args, env, message", [
    (["--port", "http"], {}, "port must be a number from 0 to 65535, got 'http'"),
    ([], {"RATE_LIMITS": "mesage=5/10s"}, "RATE_LIMITS: unknown event 'mesage'"),
    (["--db", "/nonexistent-dir/x/app.db"], {"JWT_SECRET": SECRET}, "cannot open database"),
])
def test_a_bad_setting_exits_2_with_a_one_line_error(tmp_path, args, env, message):
    done = run_cli("--db", str(tmp_path / "x.db"), *args, env=env, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("server.py: error: ") and message in lines[0]


def test_dev_token_route_issues_tokens_while_on_the_dev_secret(start_server, connect):
    server = start_server(env={"JWT_SECRET": None})
    token = server.get_json("/dev/token?user=carol&role=admin")["token"]
    tab = connect(token=token, on=server)
    assert tab.call("whoami")["userId"] == "carol"
    assert tab.call("whoami")["role"] == "admin"
    tab.close()
    assert server.get("/dev/token?role=admin")[0] == 400


def test_dev_token_route_is_404_once_jwt_secret_is_set(server):
    assert server.get("/dev/token?user=carol")[0] == 404


def dev_token_request(server, query="user=mallory&role=admin", **headers):
    return requests.get(f"{server.url}/dev/token?{query}", headers=headers, timeout=5)


def test_dev_tokens_carry_a_name_defaulting_to_the_user_id(start_server):
    server = start_server(env={"JWT_SECRET": None})
    secret = (server.db.parent / (server.db.name + ".secret")).read_text().strip()

    def claims(query):
        token = server.get_json(f"/dev/token?{query}")["token"].removeprefix("Bearer ")
        return jwt.decode(token, secret, algorithms=["HS256"])

    assert claims("user=alice")["name"] == "alice"
    assert claims("user=alice&name=Alice%20Liddell")["name"] == "Alice Liddell"


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Origin": "null"},
                                     {"Sec-Fetch-Site": "cross-site"}])
def test_a_dev_token_is_refused_to_pages_of_other_origins(start_server, headers):
    server = start_server(env={"JWT_SECRET": None})
    response = dev_token_request(server, **headers)
    assert response.status_code == 403
    assert "dev tokens are for this server's own pages" in response.json()["error"]
    assert "token" not in response.json()
    assert "Access-Control-Allow-Origin" not in response.headers
    # The positive control: the same request from the server's own page is served.
    own = dev_token_request(server, Origin=server.url, **{"Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 200 and own.json()["token"].startswith("Bearer ")
    assert "Access-Control-Allow-Origin" not in own.headers


def test_the_dev_token_route_sends_no_cors_header_while_the_others_keep_theirs(start_server):
    server = start_server(env={"JWT_SECRET": None})
    assert dev_token_request(server).status_code == 200
    assert "Access-Control-Allow-Origin" not in dev_token_request(server).headers
    assert requests.get(server.url + "/api/products", headers={"Origin": "http://x.test"},
                        timeout=5).headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("host, allowed", [
    ("evil.example:{port}", False), ("rebound.test", False),
    ("localhost:{port}", True), ("127.0.0.1:{port}", True), ("[::1]:{port}", True),
    ("192.168.1.20:{port}", True),
])
def test_a_dev_token_needs_a_host_that_cannot_be_rebound(start_server, host, allowed):
    server = start_server(env={"JWT_SECRET": None})
    port = server.url.rsplit(":", 1)[1]
    response = dev_token_request(server, Host=host.format(port=port))
    assert response.status_code == (200 if allowed else 403)
    if not allowed:
        assert "ALLOWED_HOSTS" in response.json()["error"]


def test_allowed_hosts_lets_a_workshop_use_a_lan_name(start_server):
    server = start_server(env={"JWT_SECRET": None, "ALLOWED_HOSTS": "shop.lan, Other.Lan:8000"})
    for host in ("shop.lan:8000", "other.lan", "SHOP.LAN"):
        assert dev_token_request(server, Host=host).status_code == 200, host
    assert dev_token_request(server, Host="evil.example").status_code == 403


def test_a_non_loopback_bind_on_the_dev_secret_warns_that_anyone_can_mint_tokens(start_server):
    warning = "anyone who can reach port"
    exposed = start_server(env={"JWT_SECRET": None}, args=("--host", "0.0.0.0"))
    assert warning in exposed.stdout() and "Set JWT_SECRET to turn dev tokens off" in \
        exposed.stdout()
    # The positive controls: on loopback, or with JWT_SECRET, there is nothing to warn of.
    assert warning not in start_server(env={"JWT_SECRET": None}).stdout()
    assert warning not in start_server(args=("--host", "0.0.0.0")).stdout()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_delivers_queued_notifications_closes_the_database_and_exits_0(
        start_server, sig, connect):
    server = start_server()
    sender, recipient = new_user_id(), new_user_id()
    sender_tab, recipient_tab = connect(sender, on=server), \
        connect(recipient, on=server)
    for n in range(300):            # no acks awaited: the queue is full when the signal lands
        sender_tab.client.emit("notification:send", {"toUserId": recipient, "title": f"n{n}"})
    sender_tab.call("whoami")
    assert server.stop(sig) == 0
    assert "Traceback" not in server.stderr()
    # A clean close checkpoints and removes the write-ahead log.
    assert not (server.db.parent / (server.db.name + "-wal")).exists()
    db = sqlite3.connect(server.db)
    saved, undelivered = db.execute(
        "SELECT count(*), count(*) - count(delivered_at) FROM notifications").fetchone()
    assert saved == 300 and undelivered == 0
    assert len(recipient_tab.wait_count("notification:received", saved)) == saved


def test_admin_ui_instrumentation_needs_its_credentials(start_server):
    server = start_server(env={"ADMIN_UI": "teacher:s3cret"})
    admin = socketio.Client(reconnection=False)
    admin.connect(server.url, namespaces=["/admin"], transports=["websocket"],
                  auth={"username": "teacher", "password": "s3cret"}, wait_timeout=5)
    assert admin.connected
    admin.disconnect()
    intruder = socketio.Client(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        intruder.connect(server.url, namespaces=["/admin"], transports=["websocket"],
                         auth={"username": "teacher", "password": "guess"}, wait_timeout=5)


def test_binary_data_is_answered_while_the_admin_ui_watches(start_server, connect):
    """The Admin UI is sent a copy of every event, binary data included."""
    server = start_server(env={"ADMIN_UI": "teacher:s3cret"})
    admin = socketio.Client(reconnection=False)
    seen = threading.Event()
    admin.on("event_received", lambda *args: seen.set(), namespace="/admin")
    admin.connect(server.url, namespaces=["/admin"], transports=["websocket"],
                  auth={"username": "teacher", "password": "s3cret"}, wait_timeout=5)
    try:
        tab = connect(new_user_id(), on=server)
        tab.call("joinRoom", "r")
        ack = tab.call("message", {"room": "r", "text": "hi", "meta": {"file": b"\x00"}})
        assert ack == {"error": "Invalid payload",
                       "detail": "binary attachments are not accepted; send JSON"}
        assert seen.wait(5)
    finally:
        admin.disconnect()


# =============================================================================
# 2. Connecting and identity
# =============================================================================

def test_token_in_the_auth_object_identifies_the_user(connect):
    user = new_user_id()
    tab = connect(token=make_token(user, email="u@example.com", isVerified=True))
    assert tab.call("whoami") == {"userId": user, "role": "user", "email": "u@example.com",
                                  "isVerified": True}


@pytest.mark.parametrize("prefix", ["Bearer ", "bearer ", "BEARER  ", ""])
def test_bearer_prefix_is_case_insensitive_and_optional(connect, prefix):
    user = new_user_id()
    tab = connect(token=prefix + make_token(user, bearer=False))
    assert tab.call("whoami")["userId"] == user


def test_authorization_header_is_accepted_from_non_browser_clients(connect):
    user = new_user_id()
    tab = connect(headers={"Authorization": make_token(user)})
    assert tab.call("whoami")["userId"] == user


def test_a_token_that_is_not_a_string_is_an_invalid_token(connect):
    assert connect(auth={"token": 12345}).call("whoami") == {"error": "Unauthorized",
                                                             "reason": "invalid token"}


def test_token_in_the_query_string_is_ignored(connect):
    tab = connect(query=f"?token={make_token(new_user_id(), bearer=False)}")
    assert tab.call("whoami") == {"error": "Unauthorized", "reason": "no token"}


def test_no_token_connects_anonymous_with_reason_no_token(connect):
    assert connect().call("whoami") == {"error": "Unauthorized", "reason": "no token"}


def test_expired_token_connects_anonymous_with_reason_token_expired(connect):
    token = make_token(new_user_id(), exp=int(time.time()) - 120)
    assert connect(token=token).call("whoami") == {"error": "Unauthorized",
                                                   "reason": "token expired"}


def test_expiry_has_30_seconds_of_leeway(connect):
    user = new_user_id()
    tab = connect(token=make_token(user, exp=int(time.time()) - 10))
    assert tab.call("whoami")["userId"] == user


def _unsigned(header: dict, claims: dict) -> str:
    """A JWT with no signature, as an attacker would hand-craft it."""
    def part(value):
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part(header)}.{part(claims)}."


@pytest.mark.parametrize("token", [
    pytest.param(make_token("mallory", secret="another-secret-that-is-long-enough"),
                 id="wrong-secret"),
    pytest.param(_unsigned({"alg": "none", "typ": "JWT"}, {"sub": "mallory", "role": "admin"}),
                 id="alg-none"),
    pytest.param(_unsigned({"alg": "RS256", "typ": "JWT"}, {"sub": "mallory"}) + "c2ln",
                 id="rs256-header"),
    pytest.param(make_token("mallory", nbf=int(time.time()) + 3600), id="not-yet-valid"),
    pytest.param("Bearer not.a.jwt", id="garbage"),
    pytest.param(make_token(None, role="admin"), id="no-user-id-claim"),
])
def test_a_bad_token_connects_anonymous_with_reason_invalid_token(connect, token):
    assert connect(token=token).call("whoami") == {"error": "Unauthorized",
                                                   "reason": "invalid token"}


@pytest.mark.parametrize("claims, user_id", [
    ({"id": "mongo-id-1"}, "mongo-id-1"),
    ({"userId": "u-42"}, "u-42"),
    ({"_id": "64a1b2c3d4e5f678901234ff"}, "64a1b2c3d4e5f678901234ff"),
    ({"id": 12345}, "12345"),
    ({"sub": 987}, "987"),
])
def test_identity_comes_from_sub_else_id_userId_or__id(connect, claims, user_id):
    token = "Bearer " + jwt.encode({"role": "user", **claims}, SECRET, algorithm="HS256")
    assert connect(token=token).call("whoami")["userId"] == user_id


@pytest.mark.parametrize("role, seen", [("admin", "admin"), ("manager", "user"), (None, "user")])
def test_role_is_admin_or_user(connect, role, seen):
    assert connect(token=make_token(new_user_id(), role=role)).call("whoami")["role"] == seen


def test_require_auth_refuses_anonymous_connections_with_unauthorized(start_server, connect):
    server = start_server(env={"REQUIRE_AUTH": "1"})
    for token, reason in [(None, "no token"), ("Bearer junk", "invalid token")]:
        client, refusals = socketio.Client(reconnection=False), []
        client.on("connect_error", refusals.append)
        with pytest.raises(socketio.exceptions.ConnectionError):
            client.connect(server.url, auth={"token": token} if token else None,
                           transports=["websocket"], wait_timeout=5)
        assert refusals == [{"message": "Unauthorized", "data": {"reason": reason}}]
    user = new_user_id()
    tab = connect(user, on=server)
    assert tab.call("whoami")["userId"] == user


def test_require_auth_flag_works_like_the_variable(start_server, connect):
    server = start_server(args=("--require-auth",))
    with pytest.raises(socketio.exceptions.ConnectionError):
        connect(on=server)


def test_a_user_joins_their_own_room(connect):
    user = new_user_id()
    tab = connect(user)
    connect(new_user_id()).call("typing", {"toUserId": user})
    assert tab.wait_for("typing")["from"]


def test_an_admin_joins_admin_and_admins(start_server, connect):
    """Sent to `admin` alone, and to `admins` alone, an event reaches an admin's
    tab and not a user's. The Admin UI (ADMIN_UI) sends to one room from outside
    any socket; test_scaleout.py does the same through Redis."""
    server = start_server(env={"ADMIN_UI": "teacher:s3cret"})
    admin_ui = socketio.Client(reconnection=False)
    admin_ui.connect(server.url, namespaces=["/admin"], transports=["websocket"],
                     auth={"username": "teacher", "password": "s3cret"}, wait_timeout=5)
    user = new_user_id()
    admin, user_tab = connect(new_user_id("admin"), "admin", on=server), connect(user, on=server)
    try:
        assert_admin_rooms_reach_admins_alone(
            lambda room, data: admin_ui.emit("emit", ("/", room, "typing", data),
                                             namespace="/admin"),
            [admin], user_tab, user)
    finally:
        admin_ui.disconnect()
    # Reserved rooms: joining them is refused, an admin's tab included.
    assert admin.call("joinRoom", "admin") == {"error": "Access denied"}


def test_presence_online_on_first_tab_offline_on_last(connect):
    watcher = connect(new_user_id())
    user = new_user_id()
    first = connect(user)
    online = watcher.wait_for("presence:update", lambda d: d["userId"] == user)
    assert online["status"] == "online" and set(online) == {"userId", "status", "at"}
    second = connect(user)
    first.close()
    watcher.fence()
    assert [d["status"] for d in watcher.received("presence:update") if d["userId"] == user] \
        == ["online"]
    second.close()
    offline = watcher.wait_for("presence:update",
                               lambda d: d["userId"] == user and d["status"] == "offline")
    assert offline["at"] >= online["at"]


def test_presence_offline_never_overtakes_online(connect, server):
    """Connect and disconnect in one long-polling POST (as a page that mounts
    twice does): a watcher hears online, then offline."""
    watcher, user = connect(new_user_id(), wire=True), new_user_id()
    handshake = requests.get(server.url + "/socket.io/?EIO=4&transport=polling", timeout=5)
    sid = json.loads(handshake.text[1:])["sid"]
    body = "40" + json.dumps({"token": make_token(user)}) + "\x1e41"
    requests.post(server.url + f"/socket.io/?EIO=4&transport=polling&sid={sid}", data=body,
                  timeout=5)
    watcher.wait_for("presence:update", lambda d: d["userId"] == user and d["status"] == "offline")
    assert [d["status"] for d in watcher.received("presence:update") if d["userId"] == user] \
        == ["online", "offline"]


def test_presence_reaches_the_new_connection_too(connect):
    user = new_user_id()
    tab = connect(user)
    assert tab.wait_for("presence:update", lambda d: d["userId"] == user)["status"] == "online"


def test_anonymous_sockets_have_no_presence(connect):
    watcher = connect(new_user_id())
    watcher.fence()
    before = len(watcher.received("presence:update"))
    connect().close()
    watcher.fence()
    assert len(watcher.received("presence:update")) == before
    connect(new_user_id()).close()      # the positive control: a user's tab is announced
    assert watcher.wait_count("presence:update", before + 2)[before:] != []


# =============================================================================
# 3. Ack and error format
# =============================================================================

def test_an_unknown_event_answers_unknown_event(connect):
    assert connect().call("order:delete", {"orderId": "x"}) == {
        "error": "Unknown event: order:delete"}


def test_a_payload_of_the_wrong_shape_answers_invalid_payload_with_detail(connect):
    ack = connect(new_user_id()).call("order:updateStatus", ["not", "an", "object"])
    assert ack == {"error": "Invalid payload", "detail": "payload must be an object"}


@pytest.mark.provokes_traceback
def test_an_unexpected_exception_answers_internal_error_and_keeps_the_connection(start_server,
                                                                                 connect):
    server = start_server()
    user = new_user_id()
    tab = connect(user, on=server)
    db = sqlite3.connect(server.db)
    db.execute("ALTER TABLE notifications RENAME TO notifications_away")
    db.commit()
    assert tab.call("notification:send", {"toUserId": "x"}) == {"error": "Internal error"}
    assert tab.call("whoami")["userId"] == user
    assert "Traceback" in server.stderr() and "notification:send" in server.stderr()
    db.execute("ALTER TABLE notifications_away RENAME TO notifications")
    db.commit()
    assert tab.call("notification:send", {"toUserId": "x"})["ok"] is True


def test_undecodable_arguments_answer_invalid_payload(server):
    ws = websocket.create_connection(server.url.replace("http", "ws")
                                     + "/socket.io/?EIO=4&transport=websocket", timeout=5)
    ws.recv()
    ws.send("40")
    ws.recv()
    # Engine.IO message "4", Socket.IO event "2", then the ack id and the arguments.
    junk = ['["message", {"room": 1' + "0" * 5000 + "}]", '["message", {broken',
            "[" * 5000 + "]" * 5000, "[]", '"text"']
    for ack_id, arguments in enumerate(junk, start=1):
        ws.send(f"42{ack_id}{arguments}")
        answer = ws.recv()
        while not answer.startswith(f"43{ack_id}"):
            answer = ws.recv()
        assert json.loads(answer[2 + len(str(ack_id)):])[0]["error"] == "Invalid payload"
    ws.send('429["whoami"]')
    answer = ws.recv()
    while not answer.startswith("439"):
        answer = ws.recv()
    assert json.loads(answer[3:]) == [{"error": "Unauthorized", "reason": "no token"}]


def test_integers_have_at_most_100_digits(server):
    room = new_user_id("room")

    def message_with(digits: int) -> list:
        return ["message", {"room": room, "text": "hi", "meta": {"n": int("9" * digits)}}]

    frames = frames_in_order(server, make_token(new_user_id()),
                             (["joinRoom", room], ("431",)),
                             (message_with(100), ("432",)),
                             (message_with(101), ("433",)))
    assert json.loads(frames[first_index(frames, "432")][3:]) == [{"ok": True,
                                                                 "sentTo": f"room:{room}"}]
    assert json.loads(frames[first_index(frames, "433")][3:]) == [{
        "error": "Invalid payload", "detail": "the event's arguments are not valid JSON"}]


def test_clients_cannot_send_the_reserved_connect_and_disconnect_events(server, connect):
    user = new_user_id()
    watcher = connect(new_user_id())
    ws = websocket.create_connection(server.url.replace("http", "ws")
                                     + "/socket.io/?EIO=4&transport=websocket", timeout=5)
    ws.recv()
    ws.send("40" + json.dumps({"token": make_token(user)}))
    watcher.wait_for("presence:update", lambda d: d["userId"] == user)
    for ack_id, name in enumerate(["disconnect", "connect", "disconnect"], start=1):
        if ack_id < 3:
            ws.send(f'42{ack_id}["{name}", {{}}]')
        else:  # as a binary event: one attachment, sent as its own frame
            ws.send(f'451-{ack_id}["{name}", {{"_placeholder": true, "num": 0}}]')
            ws.send_binary(b"\x00")
        answer = ws.recv()
        while not answer.startswith(f"43{ack_id}"):
            answer = ws.recv()
        assert json.loads(answer[3:])[0] == {
            "error": "Invalid payload", "detail": f"'{name}' is a reserved event name"}
    watcher.fence()
    assert [d["status"] for d in watcher.received("presence:update") if d["userId"] == user] == \
        ["online"]


def test_more_than_one_argument_answers_invalid_payload(connect):
    tab = connect()
    assert tab.client.call("joinRoom", ("a", "b"), timeout=5)["error"] == "Invalid payload"


# =============================================================================
# 3b. Bad input: every finding of the fuzzer stays fixed
# =============================================================================

def assert_others_are_served(server, connect) -> None:
    """The positive control after a closed connection: the server goes on."""
    assert server.get_json("/health") == {"ok": True}
    assert connect(on=server).call("joinRoom", "still-here") == {"ok": True, "room": "still-here"}


@pytest.mark.parametrize("field, value, error", [
    ("price", 1e308, "Price mismatch for items.0 (catalogue price 100)"),
    ("price", -1e308, "items.0.price must be a non-negative number"),
    ("price", 5e-324, "Price mismatch for items.0 (catalogue price 100)"),
    ("total", 1e308, "Total mismatch (expected 350)"),
    ("total", -1e308, "Total mismatch (expected 350)"),
    ("total", 1e300, "Total mismatch (expected 350)"),
    ("quantity", 1e308, "Total mismatch (expected 1e+310)"),
])
def test_any_finite_number_in_an_order_gets_a_protocol_answer(connect, field, value, error):
    order = json.loads(json.dumps(EXAMPLE_ORDER))
    if field == "total":
        order["total"] = value
    else:
        order["items"][0][field] = value
    ack = connect(new_user_id()).call("order:create", order)
    if field == "quantity":  # the expected total is 1e308 * 100 + 150, shown as a float
        assert ack["error"].startswith("Total mismatch (expected "), ack
    else:
        assert ack == {"error": error}


@pytest.mark.parametrize("quantity", [10 ** 20, 2 ** 63, 2 ** 64 + 1])
def test_quantities_past_64_bits_are_insufficient_stock_not_a_storage_error(connect, quantity):
    order = {"items": [{"product": TSHIRT, "quantity": quantity, "price": 100}],
             "total": quantity * 100}
    assert connect(new_user_id()).call("order:create", order) == {
        "error": f"Insufficient stock for product {TSHIRT}"}


SPOILED_FIELDS = [
    ("notification:send", {"toUserId": "{}"}, "toUserId"),
    ("notification:send", {"toUserId": "x", "title": "{}"}, "title"),
    ("notification:send", {"toUserId": "x", "body": "{}"}, "body"),
    ("notification:send", {"toUserId": "x", "meta": {"k": "{}"}}, "meta.k"),
    ("notification:send", {"toUserId": "x", "meta": {"{}": 1}}, "a key of meta"),
    ("order:create", {**EXAMPLE_ORDER, "paymentMethod": "{}"}, "paymentMethod"),
    ("order:create", {**EXAMPLE_ORDER, "idempotencyKey": "{}"}, "idempotencyKey"),
    ("order:create", {**EXAMPLE_ORDER, "shippingAddress": {"city": "{}"}}, "shippingAddress.city"),
    ("order:create", {"items": [{"product": "{}", "quantity": 1, "price": 1}], "total": 1},
     "items.0.product"),
    ("joinRoom", "{}", "the payload"),
    ("joinRoom", {"room": "{}"}, "room"),
    ("leaveRoom", "{}", "the payload"),
    ("message", {"room": "r", "text": "{}"}, "text"),
    ("typing", {"toUserId": "{}"}, "toUserId"),
    ("order:updateStatus", {"orderId": "64a1b2c3d4e5f67890123456", "status": "{}"}, "status"),
]


def spoiled(payload, text: str):
    return json.loads(json.dumps(payload).replace("{}", text.encode("unicode_escape").decode()
                                                  .replace("\\x00", "\\u0000")))


@pytest.mark.parametrize("event, payload, field", SPOILED_FIELDS)
@pytest.mark.parametrize("character, what", [
    (chr(0xD800), "a lone UTF-16 surrogate (half of a character)"),
    (chr(0xDFFF), "a lone UTF-16 surrogate (half of a character)"),
    ("\x00", "a NUL character"),
])
def test_nul_and_lone_surrogates_are_invalid_payload_naming_the_field(
        connect, event, payload, field, character, what):
    ack = connect(new_user_id()).call(event, spoiled(payload, f"a{character}b"))
    assert ack == {"error": "Invalid payload", "detail": f"{field} contains {what}"}


def test_an_event_name_with_a_lone_surrogate_is_invalid_payload(connect):
    assert connect().call("order:\ud800") == {
        "error": "Invalid payload",
        "detail": "the event name contains a lone UTF-16 surrogate (half of a character)"}


def test_whole_characters_outside_the_bmp_reach_the_room_unchanged(connect):
    room = new_user_id("room")
    sender, member = connect(new_user_id()), connect()
    for tab in (sender, member):
        tab.call("joinRoom", room)
    assert sender.call("message", {"room": room, "text": "a\ud800"})["error"] == "Invalid payload"
    assert sender.call("message", {"room": room, "text": "🛒 cart\u2028ready"})["ok"] is True
    # The valid message arrives, and it is the only one: the refused never left.
    assert member.wait_for("message")["text"] == "🛒 cart\u2028ready"
    assert [m["text"] for m in member.received("message")] == ["🛒 cart\u2028ready"]


@pytest.mark.parametrize("claims", [{"sub": "a\ud800"}, {"sub": "a\x00"},
                                    {"sub": "ok", "name": "Al\ud800"},
                                    {"sub": "ok", "email": "a\x00@b"}])
def test_token_claims_with_nul_or_lone_surrogates_are_an_invalid_token(connect, claims):
    token = make_token(None, **claims)
    assert connect(token=token).call("whoami") == {"error": "Unauthorized",
                                                   "reason": "invalid token"}


def test_a_token_string_with_a_lone_surrogate_is_an_invalid_token(connect):
    assert connect(auth={"token": "Bearer \ud800"}).call("whoami") == {
        "error": "Unauthorized", "reason": "invalid token"}


@pytest.mark.parametrize("frame", ["hello", "", "9", "0", "bnot*base64"])
def test_a_text_frame_that_is_not_an_engineio_packet_closes_with_1002(start_server, connect,
                                                                      frame):
    server = start_server()
    ws = raw_socket(server)
    ws.send(frame)
    code, reason, frames = close_frame(ws)
    assert (code, reason) == (1002, "not an Engine.IO packet" + (
        ": bad base64" if frame.startswith("b") else ""))
    assert not any(isinstance(f, str) and f.startswith("HTTP/") for f in frames)
    assert_others_are_served(server, connect)
    assert re.search(r"closing sid=\S+ user=-: not an Engine.IO packet.*websocket close 1002",
                     server.stderr())


@pytest.mark.parametrize("connect_first, garbage", [
    (False, "4abc"),                  # the protocol test suite's invalid handshake
    (True, "4abc"),                   # an unknown Socket.IO packet type
    (True, '44{"message":"x"}'),      # CONNECT_ERROR is the server's to send
    (True, b"\x00\x01"),              # a binary frame that is no attachment
    (False, "40{not json"),           # a CONNECT whose auth is not JSON
    # an attachment announced, then text where its bytes should be
    (True, ('451-["message",{"_placeholder":true,"num":0}]', '4299["whoami"]')),
])
def test_input_that_is_not_a_socketio_packet_closes_the_connection(start_server, connect,
                                                                   connect_first, garbage):
    server = start_server()
    ws = raw_socket(server, "40" if connect_first else None)
    for frame in garbage if isinstance(garbage, tuple) else (garbage,):
        if isinstance(frame, bytes):
            ws.send_binary(frame)
        else:
            ws.send(frame)
    code, _, frames = close_frame(ws)
    # Engine.IO's close packet, then a normal websocket close frame.
    assert "1" in frames and code in (None, 1000)
    assert_others_are_served(server, connect)
    assert "not a Socket.IO packet" in server.stderr()


@pytest.mark.parametrize("body, status, reason", [
    (b"hello", 400, "not an Engine.IO packet"),
    (b"\xff\xfe", 400, "not UTF-8"),
    (b"40\x1e9", 400, "not an Engine.IO packet"),       # a good packet, then a bad one
    (b"4abc", 200, "not a Socket.IO packet"),          # Engine.IO, but not Socket.IO
])
def test_a_long_polling_post_that_is_not_the_protocol_ends_its_session(start_server, connect,
                                                                       body, status, reason):
    server = start_server()
    polling = server.url + "/socket.io/?EIO=4&transport=polling"
    sid = json.loads(requests.get(polling, timeout=5).text[1:])["sid"]
    posted = requests.post(f"{polling}&sid={sid}", data=body, timeout=5)
    assert posted.status_code == status
    # The client's next poll is refused at once (the session is closed), not
    # answered with a ping 25 s later.
    next_poll = requests.get(f"{polling}&sid={sid}", timeout=5)
    assert next_poll.status_code == 400 and "disconnected" in next_poll.text
    server.wait_for_log(rf"closing sid=\S+ user=-: {reason}")
    assert_others_are_served(server, connect)


def test_an_unknown_namespace_is_refused_with_invalid_namespace(server, connect):
    ws = raw_socket(server, connect_packet=None)
    ws.send("40/random,")
    assert ws.recv() == '44/random,{"message":"Invalid namespace"}'
    ws.send("40")                       # the default namespace still connects
    assert ws.recv().startswith("40{")
    ws.close()
    client, refusals = socketio.Client(reconnection=False), []
    client.on("connect_error", refusals.append, namespace="/chat")
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect(server.url, namespaces=["/chat"], transports=["websocket"],
                       wait_timeout=5)
    client.disconnect()
    assert refusals == [{"message": "Invalid namespace"}]


def test_a_connection_that_never_sends_connect_is_closed_after_connect_timeout(start_server):
    server = start_server(env={"CONNECT_TIMEOUT": "1s"})
    silent, connected = raw_socket(server, None), raw_socket(server, "40")
    started = time.monotonic()
    code, _, frames = close_frame(silent, timeout=10)
    assert 0.9 < time.monotonic() - started < 5 and "1" in frames and code in (None, 1000)
    # The positive control: the socket that did connect is still served.
    connected.send('421["joinRoom","r"]')
    assert connected.recv() == '431[{"ok":true,"room":"r"}]'
    assert "no Socket.IO CONNECT within 1s" in server.stderr()


def test_a_connection_to_the_admin_namespace_alone_is_not_closed_by_connect_timeout(
        start_server):
    """The Admin UI connects to /admin only; that is a Socket.IO CONNECT too."""
    server = start_server(env={"CONNECT_TIMEOUT": "1s", "ADMIN_UI": "teacher:s3cret"})
    admin = socketio.Client(reconnection=False)
    admin.connect(server.url, namespaces=["/admin"], transports=["websocket"],
                  auth={"username": "teacher", "password": "s3cret"}, wait_timeout=5)
    try:
        silent = raw_socket(server, None)      # opened after the admin: its timer fires later
        close_frame(silent, timeout=10)        # the positive control: that one is closed
        assert admin.connected
        assert server.stderr().count("no Socket.IO CONNECT within 1s") == 1
    finally:
        admin.disconnect()


# =============================================================================
# 4. Events: rooms and chat
# =============================================================================

def test_join_room_acks_and_tells_the_other_members_not_the_joiner(connect):
    room = new_user_id("room")
    alice, bob = connect(new_user_id()), connect(new_user_id())
    alice.call("joinRoom", room)
    assert bob.call("joinRoom", room) == {"ok": True, "room": room}
    joined = alice.wait_for("joined")
    assert joined == {"event": "joined", "room": room, "by": bob.sid,
                      "user": {"id": bob.call("whoami")["userId"], "name": None}}
    bob.fence()
    assert bob.received("joined") == []


def test_join_room_takes_an_object_and_trims_the_name(connect):
    assert connect().call("joinRoom", {"room": "  lobby  "}) == {"ok": True, "room": "lobby"}


def test_an_anonymous_joiner_is_announced_with_user_null(connect):
    room = new_user_id("room")
    member, anonymous = connect(new_user_id()), connect()
    member.call("joinRoom", room)
    anonymous.call("joinRoom", room)
    assert member.wait_for("joined")["user"] is None


@pytest.mark.parametrize("room", ["", "   ", "x" * 65, 42, None, ["lobby"], {"room": 7}])
def test_a_room_name_is_1_to_64_characters(connect, room):
    ack = connect().call("joinRoom", room)
    assert ack["error"] == "Invalid payload" and "room" in ack["detail"]


def test_a_64_character_room_name_is_fine(connect):
    assert connect().call("joinRoom", "r" * 64)["ok"] is True


@pytest.mark.parametrize("room", ["admin", "admins", "user:someone", "user:"])
def test_reserved_rooms_are_refused_with_access_denied(connect, room):
    tab = connect(new_user_id())
    assert tab.call("joinRoom", room) == {"error": "Access denied"}
    assert tab.call("leaveRoom", room) == {"error": "Access denied"}


def test_another_sockets_id_is_a_reserved_room(connect):
    victim, spy = connect(new_user_id()), connect()
    assert spy.call("joinRoom", victim.sid) == {"error": "Access denied"}


def test_product_rooms_may_be_joined(connect):
    assert connect().call("joinRoom", f"product:{TSHIRT}")["ok"] is True


def test_leave_room_acks_and_tells_the_remaining_members(connect):
    room = new_user_id("room")
    alice, bob = connect(new_user_id()), connect(new_user_id())
    alice.call("joinRoom", room)
    bob.call("joinRoom", room)
    assert bob.call("leaveRoom", room) == {"ok": True, "room": room}
    left = alice.wait_for("left")
    assert left["event"] == "left" and left["room"] == room and left["by"] == bob.sid
    assert left["user"]["id"] == bob.call("whoami")["userId"]
    bob.fence()
    assert bob.received("left") == []


def test_leave_room_acks_when_not_a_member(connect):
    assert connect().call("leaveRoom", {"room": "never-joined"}) == {"ok": True,
                                                                     "room": "never-joined"}


def test_message_reaches_every_member_including_the_sender(connect):
    room = new_user_id("room")
    user = new_user_id()
    alice, bob, outsider = connect(user), connect(new_user_id()), connect(new_user_id())
    alice.call("joinRoom", room)
    bob.call("joinRoom", room)
    ack = alice.call("message", {"room": room, "text": " hello ", "meta": {"color": "red"}})
    assert ack == {"ok": True, "sentTo": f"room:{room}"}
    for tab in (alice, bob):
        got = tab.wait_for("message")
        assert got["room"] == room and got["text"] == "hello"
        assert got["from"] == {"id": user, "name": None} and got["meta"] == {"color": "red"}
        assert set(logged(got)) == {"room", "text", "from", "ts", "meta"}
    outsider.fence()
    assert outsider.received("message") == []


def test_an_anonymous_message_is_from_null(connect):
    room = new_user_id("room")
    tab = connect()
    tab.call("joinRoom", room)
    tab.call("message", {"room": room, "text": "hi"})
    assert tab.wait_for("message")["from"] is None


def test_message_needs_membership(connect):
    assert connect().call("message", {"room": "elsewhere", "text": "hi"}) == {
        "error": "Not in room"}


@pytest.mark.parametrize("payload, detail", [
    ({"room": "r", "text": "   "}, "text must be 1-2000 characters"),
    ({"room": "r", "text": "x" * 2001}, "text must be 1-2000 characters"),
    ({"room": "r", "text": 5}, "text must be a string"),
    ({"room": "r", "text": "hi", "meta": "x"}, "meta must be an object"),
    ({"room": "r", "text": "hi", "meta": {"k": "x" * 4100}}, "meta must be at most 4096 bytes"),
    ("just text", "payload must be an object"),
])
def test_message_text_and_meta_bounds(connect, payload, detail):
    tab = connect()
    tab.call("joinRoom", "r")
    ack = tab.call("message", payload)
    assert ack["error"] == "Invalid payload" and detail in ack["detail"]


@pytest.mark.parametrize("event, payload", [
    ("message", {"room": "r", "text": "hi", "meta": {"file": b"\x00\x01"}}),
    ("message", {"room": "r", "text": b"hi"}),
    ("notification:send", {"toUserId": "someone", "meta": {"file": b"\x00"}}),
    ("order:create", {**EXAMPLE_ORDER, "shippingAddress": {"zip": b"\x01"}}),
    ("order:create", {"items": [{"product": b"\x00", "quantity": 1, "price": 1}], "total": 1}),
])
def test_binary_attachments_are_invalid_payload(connect, event, payload):
    tab = connect(new_user_id())
    tab.call("joinRoom", "r")
    assert tab.call(event, payload) == {
        "error": "Invalid payload", "detail": "binary attachments are not accepted; send JSON"}


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_meta_with_nan_or_infinity_is_invalid_payload_and_never_reaches_the_room(
        server, connect, number):
    """Python's JSON reads NaN and Infinity; a browser's JSON.parse would choke on them."""
    room = new_user_id("room")
    member = connect()
    member.call("joinRoom", room)
    frames = frames_in_order(server, make_token(new_user_id()),
                             (["joinRoom", room], ("431",)),
                             ((f'["message", {{"room": "{room}", "text": "hi",'
                               f' "meta": {{"x": {number}}}}}]'),
                              ("432",)))
    ack = json.loads(frames[first_index(frames, "432")][3:])[0]
    assert ack == {"error": "Invalid payload",
                   "detail": "meta must be plain JSON (no binary data, NaN or Infinity)"}
    member.fence()
    assert member.received("message") == []


def test_whoami_answers_identity_without_ok(connect):
    user = new_user_id()
    assert connect(token=make_token(user, role="admin", email="e@x.io")).call("whoami", None) \
        == {"userId": user, "role": "admin", "email": "e@x.io", "isVerified": False}


# =============================================================================
# 4. Events: notifications
# =============================================================================

def test_notification_is_saved_before_the_ack_and_delivered_live(connect):
    sender, recipient = new_user_id(), new_user_id()
    sender_tab, recipient_tab = connect(sender), connect(recipient)
    ack = sender_tab.call("notification:send", {
        "toUserId": recipient, "type": "warning", "title": "Hi", "body": "Test",
        "meta": {"orderId": "1"}, "priority": "high"})
    assert ack == {"ok": True, "queued": True, "saved": True, "id": ack["id"]}
    got = logged(recipient_tab.wait_for("notification:received"))
    assert got == {"event": "notification:received", "id": ack["id"], "type": "warning",
                   "title": "Hi", "body": "Test", "meta": {"orderId": "1"},
                   "priority": "high", "from": sender, "ts": got["ts"]}


def test_notification_defaults_are_info_and_normal(connect):
    recipient = new_user_id()
    tab = connect(recipient)
    connect(new_user_id()).call("notification:send", {"toUserId": recipient})
    got = tab.wait_for("notification:received")
    assert (got["type"], got["priority"], got["title"], got["body"], got["meta"]) == \
        ("info", "normal", None, None, None)


def test_notification_reaches_every_tab_of_the_recipient_once(connect):
    recipient = new_user_id()
    tabs = [connect(recipient), connect(recipient)]
    connect(new_user_id()).call("notification:send", {"toUserId": recipient})
    for tab in tabs:
        tab.wait_for("notification:received")
        tab.fence()
    assert [len(tab.received("notification:received")) for tab in tabs] == [1, 1]


def test_an_offline_recipient_gets_every_notification_oldest_first_on_next_connect(connect):
    sender, recipient = connect(new_user_id()), new_user_id()
    ids = [sender.call("notification:send", {"toUserId": recipient, "title": f"#{n}"})["id"]
           for n in range(3)]
    tab = connect(recipient)
    assert [n["id"] for n in tab.wait_count("notification:received", 3)] == ids
    tab.fence()
    assert len(tab.received("notification:received")) == 3
    tab.close()
    again = connect(recipient)
    again.fence()
    assert again.received("notification:received") == []
    sender.call("notification:send", {"toUserId": recipient, "title": "live"})   # the control
    assert again.wait_for("notification:received")["title"] == "live"


@pytest.mark.parametrize("payload, error", [
    ({}, {"error": "toUserId is required"}),
    ({"toUserId": ""}, {"error": "toUserId is required"}),
    ({"toUserId": 7}, {"error": "toUserId is required"}),
    ({"toUserId": "x", "type": "spam"}, {"error": "Invalid type"}),
    ({"toUserId": "x", "priority": "urgent"}, {"error": "Invalid priority"}),
    ({"toUserId": "x", "title": "t" * 201},
     {"error": "Invalid payload", "detail": "title must be at most 200 characters"}),
    ({"toUserId": "x", "body": "b" * 2001},
     {"error": "Invalid payload", "detail": "body must be at most 2000 characters"}),
    ({"toUserId": "x", "meta": [1]},
     {"error": "Invalid payload", "detail": "meta must be an object"}),
    (None, {"error": "Invalid payload", "detail": "payload must be an object"}),
])
def test_notification_send_errors(connect, payload, error):
    assert connect(new_user_id()).call("notification:send", payload) == error


def test_notification_send_needs_a_user(connect):
    assert connect().call("notification:send", {"toUserId": "x"}) == {
        "error": "Unauthorized", "reason": "no token"}


def test_without_the_queue_delivery_is_inline_and_queued_is_false(start_server, connect):
    server = start_server(env={"NOTIFY_QUEUE": "0"})
    recipient = new_user_id()
    tab, sender = connect(recipient, on=server), connect("s", on=server)
    ack = sender.call("notification:send", {"toUserId": recipient, "title": "inline"})
    assert ack["queued"] is False and ack["saved"] is True
    assert tab.wait_for("notification:received")["id"] == ack["id"]


# =============================================================================
# 4. Events: orders
# =============================================================================

def test_the_original_example_order_is_created_pending_with_total_350(connect):
    user = new_user_id()
    ack = connect(user).call("order:create", {**EXAMPLE_ORDER, "paymentMethod": "card",
                                              "shippingAddress": {"city": "Kyiv"}})
    order = ack["order"]
    assert ack["ok"] is True and set(ack) == {"ok", "order"}
    assert set(order) == {"_id", "user", "items", "shippingAddress", "paymentMethod", "total",
                          "status", "createdAt", "updatedAt"}
    assert len(order["_id"]) == 24 and int(order["_id"], 16) >= 0
    assert (order["user"], order["total"], order["status"]) == (user, 350, "pending")
    assert order["items"] == EXAMPLE_ORDER["items"]
    assert order["shippingAddress"] == {"city": "Kyiv"} and order["paymentMethod"] == "card"
    assert order["createdAt"] == order["updatedAt"]


def test_order_created_reaches_owner_and_admins_once_per_socket(connect):
    user = new_user_id()
    owner_tab, admin_tab, stranger = connect(user), connect(new_user_id(), "admin"), \
        connect(new_user_id())
    order = owner_tab.call("order:create", EXAMPLE_ORDER)["order"]
    for tab in (owner_tab, admin_tab):
        assert logged(tab.wait_for("order:created",
                                   lambda d: d["order"]["_id"] == order["_id"])) == \
            {"event": "order:created", "order": order}
    for tab in (admin_tab, owner_tab, stranger):
        tab.fence()
    assert len([d for d in admin_tab.received("order:created")
                if d["order"]["_id"] == order["_id"]]) == 1
    assert len(owner_tab.received("order:created")) == 1
    assert stranger.received("order:created") == []


def test_the_ack_comes_before_the_order_created_event(server):
    frames = frames_in_order(server, make_token(new_user_id()),
                             (["order:create", EXAMPLE_ORDER], ("431", '42["order:created"')))
    assert first_index(frames, "431") < first_index(frames, '42["order:created"')


def test_a_socket_upgraded_from_long_polling_gets_every_ack_and_event(connect):
    """socket.io-client's default: long-polling first, then the websocket
    (whose writer sends a batch of packets in one write): the upgrade's probe
    is answered, and every ack and event arrives."""
    tab = connect(new_user_id(), transports=("polling", "websocket"))
    assert tab.client.transport() == "websocket"
    placed = {tab.call("order:create", EXAMPLE_ORDER)["order"]["_id"] for _ in range(5)}
    assert {d["order"]["_id"] for d in tab.wait_count("order:created", 5)} == placed


def test_one_sockets_events_are_handled_in_the_order_it_sent_them(server):
    """Sent back to back without waiting, a join, messages and a leave are
    handled in order: every message finds its sender in the room."""
    room = new_user_id("room")
    steps = [(["joinRoom", room], ()), *[
        ((["message", {"room": room, "text": f"#{n}"}]), ()) for n in range(30)],
        (["leaveRoom", room], ()), (["message", {"room": room, "text": "late"}], ())]
    ws = raw_socket(server, "40" + json.dumps({"token": make_token(new_user_id())}))
    for ack_id, (event, _) in enumerate(steps, start=1):
        ws.send(f"42{ack_id}" + json.dumps(event))
    acks, texts = {}, []
    while len(acks) < len(steps):
        frame = ws.recv()
        if frame.startswith("43"):
            ack_id = re.match(r"43(\d+)", frame)[1]
            acks[int(ack_id)] = json.loads(frame[2 + len(ack_id):])[0]
        elif frame.startswith('42["message"'):
            texts.append(json.loads(frame[2:])[1]["text"])
    ws.close()
    assert acks[1] == {"ok": True, "room": room}
    assert all(acks[n] == {"ok": True, "sentTo": f"room:{room}"} for n in range(2, 32))
    assert acks[32] == {"ok": True, "room": room} and acks[33] == {"error": "Not in room"}
    assert texts == [f"#{n}" for n in range(30)]


def test_the_ack_comes_before_the_senders_own_copy_of_a_room_message(server):
    room = new_user_id("room")
    frames = frames_in_order(server, make_token(new_user_id()),
                             (["joinRoom", room], ("431",)),
                             (["message", {"room": room, "text": "hi"}], ("432", '42["message"')))
    assert first_index(frames, "432") < first_index(frames, '42["message"')


def bad_item(**fields):
    return {"items": [{"product": TSHIRT, "quantity": 1, "price": 100, **fields}], "total": 100}


@pytest.mark.parametrize("payload, error", [
    ({"total": 1}, "items must be a non-empty array"),
    ({"items": "x", "total": 1}, "items must be a non-empty array"),
    ({"items": [], "total": 1}, "items must be a non-empty array"),
    ({"items": [{"product": TSHIRT, "quantity": 1, "price": 100}] * 101, "total": 10100},
     "too many items"),
    (bad_item(product="<64a1b2c3d4e5f67890123456>"),
     'Cast to ObjectId failed for value "<64a1b2c3d4e5f67890123456>" at path "items.0.product"'),
    (bad_item(product=12), 'Cast to ObjectId failed for value "12" at path "items.0.product"'),
    (bad_item(price=None), "items.0.price: Path 'price' is required"),
    (bad_item(quantity=None), "items.0.quantity: Path 'quantity' is required"),
    (bad_item(quantity=0), "items.0.quantity must be a positive integer"),
    (bad_item(quantity=1.5), "items.0.quantity must be a positive integer"),
    (bad_item(quantity=True), "items.0.quantity must be a positive integer"),
    (bad_item(quantity="2"), "items.0.quantity must be a positive integer"),
    (bad_item(price=-1), "items.0.price must be a non-negative number"),
    (bad_item(price="100"), "items.0.price must be a non-negative number"),
    (bad_item(price=False), "items.0.price must be a non-negative number"),
    ({"items": [{"product": TSHIRT, "quantity": 1, "price": 100}]},
     "total: Path 'total' is required"),
    ({**bad_item(), "total": "100"}, "total must be a number"),
    (bad_item(product="64a1b2c3d4e5f6789012ffff"), "Product not found: 64a1b2c3d4e5f6789012ffff"),
    (bad_item(price=99.99), "Price mismatch for items.0 (catalogue price 100)"),
    ({**EXAMPLE_ORDER, "total": 349.99}, "Total mismatch (expected 350)"),
    (one_item_order(MUG, quantity=21, price=150), f"Insufficient stock for product {MUG}"),
])
def test_order_create_validation_messages(connect, payload, error):
    assert connect(new_user_id()).call("order:create", payload) == {"error": error}


@pytest.mark.parametrize("address, detail", [
    ("Kyiv", "shippingAddress must be an object"),
    ({"line": "x" * 4100}, "shippingAddress must be at most 4096 bytes as JSON"),
])
def test_a_shipping_address_is_a_plain_json_object_of_at_most_4096_bytes(connect, address, detail):
    ack = connect(new_user_id()).call("order:create", {**EXAMPLE_ORDER, "shippingAddress": address})
    assert ack == {"error": "Invalid payload", "detail": detail}


def test_order_validation_names_the_failing_item_index(connect):
    payload = {"items": [{"product": TSHIRT, "quantity": 1, "price": 100},
                         {"product": MUG, "quantity": 1}], "total": 250}
    assert connect(new_user_id()).call("order:create", payload) == {
        "error": "items.1.price: Path 'price' is required"}


def test_totals_are_compared_in_cents(start_server, connect):
    server = start_server()
    tab = connect(new_user_id(), on=server)
    # 0.29 * 100 is 28.999999999999996 and 3 * 0.29 is 0.8699999999999999 in floating
    # point; in cents they are 29 and 87.
    db = sqlite3.connect(server.db)
    db.execute(f"UPDATE products SET price_cents = 29 WHERE id = '{STICKERS}'")
    db.commit()
    ack = tab.call("order:create", {"items": [{"product": STICKERS, "quantity": 3,
                                               "price": 0.29}], "total": 0.87})
    assert ack["ok"] is True and ack["order"]["total"] == 0.87
    assert ack["order"]["items"][0]["price"] == 0.29


def test_order_create_needs_a_user(connect):
    assert connect().call("order:create", EXAMPLE_ORDER) == {"error": "Unauthorized",
                                                             "reason": "no token"}


def test_a_retried_create_with_the_same_idempotency_key_returns_the_original(connect):
    tab, admin = connect(new_user_id()), connect(new_user_id(), "admin")
    first = tab.call("order:create", {**EXAMPLE_ORDER, "idempotencyKey": "cart-1"})
    again = tab.call("order:create", {**EXAMPLE_ORDER, "idempotencyKey": "cart-1"})
    assert again == {"ok": True, "order": first["order"], "duplicate": True}
    admin.fence()
    tab.fence()
    assert len([d for d in admin.received("order:created")
                if d["order"]["_id"] == first["order"]["_id"]]) == 1
    assert len(tab.received("order:created")) == 1
    other = connect(new_user_id()).call("order:create", {**EXAMPLE_ORDER,
                                                          "idempotencyKey": "cart-1"})
    assert other["order"]["_id"] != first["order"]["_id"]


@pytest.mark.parametrize("key", ["", "k" * 65, 12])
def test_an_idempotency_key_is_a_string_of_at_most_64_characters(connect, key):
    ack = connect(new_user_id()).call("order:create", {**EXAMPLE_ORDER, "idempotencyKey": key})
    assert ack["error"] == "Invalid payload" and "idempotencyKey" in ack["detail"]


def create(tab, payload=None):
    return tab.call("order:create", payload or one_item_order())["order"]


@pytest.mark.parametrize("order_id", ["nope", 12, None, "64a1b2c3d4e5f6789012345"])
def test_update_status_with_a_bad_id_is_a_cast_error(connect, order_id):
    ack = connect(new_user_id()).call("order:updateStatus", {"orderId": order_id,
                                                             "status": "paid"})
    shown = order_id if isinstance(order_id, str) else "undefined" if order_id is None \
        else json.dumps(order_id)
    assert ack == {"error": f'Cast to ObjectId failed for value "{shown}" at path "_id"'}


def test_update_status_of_an_unknown_order_is_order_not_found(connect):
    assert connect(new_user_id()).call("order:updateStatus", {
        "orderId": "0123456789abcdef01234567", "status": "paid"}) == {"error": "Order not found"}


def test_update_status_by_another_user_is_access_denied(connect):
    order = create(connect(new_user_id()))
    assert connect(new_user_id()).call("order:updateStatus", {
        "orderId": order["_id"], "status": "cancelled"}) == {"error": "Access denied"}


@pytest.mark.parametrize("status", ["refunded", "", 5, None, "PAID"])
def test_update_status_to_an_unknown_status_is_invalid_status(connect, status):
    tab = connect(new_user_id())
    assert tab.call("order:updateStatus", {"orderId": create(tab)["_id"], "status": status}) == \
        {"error": "Invalid status"}


ALLOWED = {("pending", "paid"), ("pending", "cancelled"), ("paid", "shipped"),
           ("paid", "cancelled"), ("shipped", "completed")}
PATHS = {"pending": [], "paid": ["paid"], "shipped": ["paid", "shipped"],
         "completed": ["paid", "shipped", "completed"], "cancelled": ["cancelled"]}


@pytest.mark.parametrize("current", list(PATHS))
@pytest.mark.parametrize("target", list(PATHS))
def test_status_transitions(connect, current, target):
    admin = connect(new_user_id(), "admin")
    order = create(admin)
    for step in PATHS[current]:
        assert admin.call("order:updateStatus", {"orderId": order["_id"], "status": step})["ok"]
    ack = admin.call("order:updateStatus", {"orderId": order["_id"], "status": target})
    if current == target or (current, target) in ALLOWED:
        assert ack["ok"] is True and ack["order"]["status"] == target
    else:
        assert ack == {"error": f"Invalid status transition: {current} -> {target}"}


def test_setting_the_current_status_is_a_no_op_that_acks_ok(connect):
    tab, admin = connect(new_user_id()), connect(new_user_id(), "admin")
    order = create(tab)
    ack = tab.call("order:updateStatus", {"orderId": order["_id"], "status": "pending"})
    assert ack == {"ok": True, "order": order}
    # The positive control: a real change after it is the only update the admin gets.
    tab.call("order:updateStatus", {"orderId": order["_id"], "status": "cancelled"})
    admin.wait_for("order:updated", lambda d: d["order"]["_id"] == order["_id"])
    admin.fence()
    assert [d["order"]["status"] for d in admin.received("order:updated")
            if d["order"]["_id"] == order["_id"]] == ["cancelled"]


def test_the_owner_may_pay_and_cancel_but_not_ship(connect):
    tab = connect(new_user_id())
    paid = create(tab)
    assert tab.call("order:updateStatus", {"orderId": paid["_id"], "status": "paid"})["ok"]
    assert tab.call("order:updateStatus", {"orderId": paid["_id"], "status": "shipped"}) == \
        {"error": "Access denied"}
    assert tab.call("order:updateStatus", {"orderId": paid["_id"], "status": "cancelled"})["ok"]


def test_an_admin_may_change_anyones_order(connect):
    order = create(connect(new_user_id()))
    admin = connect(new_user_id(), "admin")
    for status in ("paid", "shipped", "completed"):
        ack = admin.call("order:updateStatus", {"orderId": order["_id"], "status": status})
        assert ack["ok"] is True and ack["order"]["status"] == status


def test_order_updated_reaches_owner_and_admins_once_per_socket(connect):
    user = new_user_id()
    owner, admin, stranger = connect(user), connect(new_user_id(), "admin"), \
        connect(new_user_id())
    order = create(owner)
    ack = owner.call("order:updateStatus", {"orderId": order["_id"], "status": "cancelled"})
    for tab in (owner, admin):
        assert logged(tab.wait_for("order:updated",
                                   lambda d: d["order"]["_id"] == order["_id"])) == \
            {"event": "order:updated", "order": ack["order"]}
    for tab in (admin, owner, stranger):
        tab.fence()
    assert len([d for d in admin.received("order:updated")
                if d["order"]["_id"] == order["_id"]]) == 1
    assert len(owner.received("order:updated")) == 1
    assert stranger.received("order:updated") == []
    assert ack["order"]["updatedAt"] >= ack["order"]["createdAt"]


def test_paying_takes_stock_and_tells_every_client(start_server, connect):
    server = start_server()
    owner = connect(new_user_id(), on=server)
    anonymous = connect(on=server)
    order = create(owner, EXAMPLE_ORDER)
    owner.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"})
    assert server.stock(TSHIRT) == 48 and server.stock(MUG) == 19
    updates = anonymous.wait_count("product:stockUpdated", 2)
    assert {u["productId"]: (u["stock"], u["delta"]) for u in updates} == {
        TSHIRT: (48, -2), MUG: (19, -1)}
    assert all(u["event"] == "product:stockUpdated" and u["at"] for u in updates)


def test_cancelling_a_paid_order_puts_the_stock_back(start_server, connect):
    server = start_server()
    owner = connect(new_user_id(), on=server)
    order = create(owner, one_item_order(MUG, 3, 150))
    owner.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"})
    assert server.stock(MUG) == 17
    owner.call("order:updateStatus", {"orderId": order["_id"], "status": "cancelled"})
    assert server.stock(MUG) == 20
    back = owner.wait_for("product:stockUpdated", lambda u: u["delta"] > 0)
    assert (back["productId"], back["stock"], back["delta"]) == (MUG, 20, 3)


def test_cancelling_a_pending_order_moves_no_stock(start_server, connect):
    server = start_server()
    owner = connect(new_user_id(), on=server)
    order = create(owner, one_item_order(MUG, 3, 150))
    owner.call("order:updateStatus", {"orderId": order["_id"], "status": "cancelled"})
    owner.fence()
    assert server.stock(MUG) == 20 and owner.received("product:stockUpdated") == []
    paid = create(owner, one_item_order(MUG, 1, 150))    # the positive control: paying moves it
    owner.call("order:updateStatus", {"orderId": paid["_id"], "status": "paid"})
    assert owner.wait_for("product:stockUpdated")["stock"] == 19


def test_paying_without_enough_stock_leaves_order_and_stock_unchanged(start_server, connect):
    server = start_server()
    first, second = (connect(new_user_id(), on=server) for _ in range(2))
    mugs = create(first, one_item_order(MUG, 15, 150))
    more = create(second, {"items": [{"product": TSHIRT, "quantity": 1, "price": 100},
                                     {"product": MUG, "quantity": 10, "price": 150}],
                           "total": 1600})
    first.call("order:updateStatus", {"orderId": mugs["_id"], "status": "paid"})
    ack = second.call("order:updateStatus", {"orderId": more["_id"], "status": "paid"})
    assert ack == {"error": f"Insufficient stock for product {MUG}"}
    assert server.stock(TSHIRT) == 50 and server.stock(MUG) == 5
    assert second.call("order:updateStatus", {"orderId": more["_id"], "status": "pending"}
                       )["order"]["status"] == "pending"


def test_ten_concurrent_payments_for_the_last_poster_sell_it_once(start_server, connect):
    server = start_server()
    tabs = [connect(new_user_id(), on=server) for _ in range(10)]
    orders = [create(tab, one_item_order(POSTER, 1, 40)) for tab in tabs]
    barrier, acks = threading.Barrier(10), [None] * 10

    def pay(n):
        barrier.wait()
        acks[n] = tabs[n].call("order:updateStatus", {"orderId": orders[n]["_id"],
                                                      "status": "paid"})

    threads = [threading.Thread(target=pay, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(1 for ack in acks if ack.get("ok")) == 1
    assert [ack for ack in acks if not ack.get("ok")] == \
        [{"error": f"Insufficient stock for product {POSTER}"}] * 9
    assert server.stock(POSTER) == 0


def test_paying_one_order_many_times_at_once_moves_its_stock_once(start_server, connect):
    server = start_server()
    tabs = [connect("buyer", on=server) for _ in range(5)]
    order = create(tabs[0], one_item_order(MUG, 2, 150))
    barrier, acks = threading.Barrier(5), []

    def pay(tab):
        barrier.wait()
        acks.append(tab.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"}))

    threads = [threading.Thread(target=pay, args=(tab,)) for tab in tabs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [ack["order"]["status"] for ack in acks] == ["paid"] * 5
    assert server.stock(MUG) == 18
    tabs[0].fence()
    assert len(tabs[0].received("product:stockUpdated")) == 1


def test_order_update_status_needs_a_user(connect):
    assert connect().call("order:updateStatus", {"orderId": "0" * 24, "status": "paid"}) == \
        {"error": "Unauthorized", "reason": "no token"}


# =============================================================================
# 4. Events: typing
# =============================================================================

def test_personal_typing_reaches_the_user_room(connect):
    sender, recipient = new_user_id(), new_user_id()
    target = connect(recipient)
    assert connect(sender).call("typing", {"toUserId": recipient}) == {"ok": True,
                                                                      "mode": "personal"}
    got = target.wait_for("typing")
    assert got == {"event": "typing", "from": sender, "at": got["at"]}


def test_room_typing_reaches_the_other_members(connect):
    room, sender = new_user_id("room"), new_user_id()
    typist, member = connect(sender), connect(new_user_id())
    typist.call("joinRoom", room)
    member.call("joinRoom", room)
    assert typist.call("typing", {"room": room}) == {"ok": True, "mode": "room"}
    got = member.wait_for("typing")
    assert got == {"event": "typing", "from": sender, "room": room, "at": got["at"]}
    typist.fence()
    assert typist.received("typing") == []


def test_room_typing_needs_membership(connect):
    assert connect(new_user_id()).call("typing", {"room": "elsewhere"}) == {"error": "Not in room"}


@pytest.mark.parametrize("payload", [{}, {"toUserId": "a", "room": "b"}, {"toUserId": 5}, "a"])
def test_typing_takes_exactly_one_of_to_user_id_or_room(connect, payload):
    assert connect(new_user_id()).call("typing", payload)["error"] == "Invalid payload"


def test_typing_needs_a_user(connect):
    assert connect().call("typing", {"toUserId": "x"}) == {"error": "Unauthorized",
                                                           "reason": "no token"}


# =============================================================================
# 5. Storage
# =============================================================================

def test_a_restart_keeps_orders_and_delivers_saved_notifications(start_server, tmp_path, connect):
    db = tmp_path / "kept.db"
    server = start_server(db=db)
    owner, recipient = new_user_id(), new_user_id()
    tab = connect(owner, on=server)
    order = create(tab, one_item_order(MUG, 2, 150))
    tab.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"})
    note = tab.call("notification:send", {"toUserId": recipient, "title": "while you were away"})
    tab.close()
    assert server.stop() == 0

    server = start_server(db=db)
    assert server.stock(MUG) == 18
    tab = connect(owner, on=server)
    kept = tab.call("order:updateStatus", {"orderId": order["_id"], "status": "paid"})
    assert kept["order"]["status"] == "paid" and kept["order"]["items"] == order["items"]
    away = connect(recipient, on=server)
    assert away.wait_for("notification:received")["id"] == note["id"]


def test_every_acked_order_survives_kill_9(start_server, tmp_path, connect):
    db = tmp_path / "crash.db"
    server = start_server(db=db)
    user = new_user_id()
    tab = connect(user, on=server)
    acked, stop = [], threading.Event()

    def stream():
        while not stop.is_set():
            try:
                ack = tab.call("order:create", one_item_order(), timeout=2)
            except socketio.exceptions.SocketIOError:
                return
            if ack.get("ok"):
                acked.append(ack["order"]["_id"])

    writer = threading.Thread(target=stream)
    writer.start()
    deadline = time.monotonic() + 30
    while len(acked) < 50 and writer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(acked) >= 50, f"only {len(acked)} orders acked before the kill"
    server.kill()
    stop.set()
    writer.join()
    tab.close()

    server = start_server(db=db)
    tab = connect(user, on=server)
    for order_id in acked:
        ack = tab.call("order:updateStatus", {"orderId": order_id, "status": "pending"})
        assert ack.get("ok") is True, (order_id, ack)


def test_committed_orders_reach_the_database_file_while_the_server_runs(start_server, tmp_path,
                                                                       connect):
    """Checkpoints run in the background: while the server runs and nothing more
    is written, the main file alone (what a copy that skips the -wal file would
    hold) comes to have every order; they do not stay in the WAL until a stop.
    The deadline only bounds the wait: how fast is no rule this test checks."""
    server = start_server(db=tmp_path / "main.db")
    tab = connect(new_user_id(), on=server)
    order_ids = [create(tab)["_id"] for _ in range(20)]
    started, stored = time.monotonic(), set()
    for attempt in itertools.count():
        if set(order_ids) <= stored or time.monotonic() - started > 5:
            break
        time.sleep(0.1)
        copy = tmp_path / f"copy-{attempt}.db"        # the main file alone, no -wal
        copy.write_bytes((tmp_path / "main.db").read_bytes())
        try:
            with sqlite3.connect(copy) as db:
                stored = {row[0] for row in db.execute("SELECT id FROM orders")}
            db.close()
        except sqlite3.OperationalError:              # not even the schema is there yet
            stored = set()
    assert set(order_ids) <= stored, "orders still only in the WAL after 5 s"
    assert server.proc.poll() is None      # written by a checkpoint, not by a stop


def test_ids_are_24_hex_object_ids_in_creation_order(connect):
    tab = connect(new_user_id())
    ids = [create(tab)["_id"] for _ in range(3)]
    assert all(len(i) == 24 and int(i, 16) for i in ids)
    assert ids == sorted(ids)


# =============================================================================
# 7. Limits
# =============================================================================

def test_rate_limits_answer_with_retry_after_ms(start_server, connect):
    server = start_server(env={"RATE_LIMITS": "message=3/10s"})
    tab = connect(new_user_id(), on=server)
    tab.call("joinRoom", "r")
    acks = [tab.call("message", {"room": "r", "text": "hi"}) for _ in range(4)]
    assert [a.get("ok") for a in acks[:3]] == [True] * 3
    assert acks[3]["error"] == "Rate limit exceeded" and 0 < acks[3]["retryAfterMs"] <= 3400


def test_rate_limits_are_per_user_across_tabs(start_server, connect):
    server = start_server(env={"RATE_LIMITS": "typing=2/10s"})
    user = new_user_id()
    first, second = connect(user, on=server), connect(user, on=server)
    assert first.call("typing", {"toUserId": "x"})["ok"]
    assert second.call("typing", {"toUserId": "x"})["ok"]
    assert first.call("typing", {"toUserId": "x"})["error"] == "Rate limit exceeded"
    other = connect(new_user_id(), on=server)
    assert other.call("typing", {"toUserId": "x"})["ok"]


def test_rate_limits_are_per_socket_for_anonymous(start_server, connect):
    server = start_server(env={"RATE_LIMITS": "*=2/10s"})
    first, second = connect(on=server), connect(on=server)
    assert [first.call("joinRoom", "r").get("ok") for _ in range(2)] == [True, True]
    assert first.call("joinRoom", "r")["error"] == "Rate limit exceeded"
    assert second.call("joinRoom", "r")["ok"] is True


def test_default_rate_limits_apply_without_configuration(start_server, connect):
    server = start_server(env={"RATE_LIMITS": None})
    tab = connect(new_user_id(), on=server)
    acks = [tab.call("order:create", one_item_order()) for _ in range(6)]
    assert [bool(a.get("ok")) for a in acks] == [True] * 5 + [False]
    assert acks[5]["error"] == "Rate limit exceeded"
    tab.call("joinRoom", "r")
    messages = [tab.call("message", {"room": "r", "text": "x"}) for _ in range(21)]
    assert messages[19].get("ok") and messages[20]["error"] == "Rate limit exceeded"


def test_rate_limits_off_lets_everything_through(connect):
    tab = connect(new_user_id())
    assert all(tab.call("typing", {"toUserId": "x"}).get("ok") for _ in range(60))


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_a_packet_above_max_payload_bytes_closes_only_that_connection(start_server, transport,
                                                                       connect):
    server = start_server(env={"MAX_PAYLOAD_BYTES": "2000"})
    sender, bystander = connect(on=server, transports=(transport,)), connect(on=server)
    sender.client.emit("message", {"room": "r", "text": "x" * 5000})
    assert sender.disconnected.wait(5)
    assert bystander.call("joinRoom", "r")["ok"] is True
    assert connect(on=server).call("joinRoom", "r")["ok"] is True


@pytest.mark.parametrize("fragmented", [False, True])
def test_an_oversized_websocket_message_closes_with_1009_and_one_log_line(start_server, connect,
                                                                         fragmented):
    server = start_server(env={"MAX_PAYLOAD_BYTES": "2000"})
    user = new_user_id()
    ws = raw_socket(server, "40" + json.dumps({"token": make_token(user)}))
    message = '42["message",{"room":"r","text":"' + "x" * 5000 + '"}]'
    if fragmented:  # frames below the limit, a message above it
        parts = [message[n:n + 1000] for n in range(0, len(message), 1000)]
        for n, part in enumerate(parts):
            ws.send_frame(websocket.ABNF.create_frame(
                part, websocket.ABNF.OPCODE_TEXT if n == 0 else websocket.ABNF.OPCODE_CONT,
                fin=int(n == len(parts) - 1)))
    else:
        ws.send(message)
    code, reason, _ = close_frame(ws)
    assert code == 1009 and "above" in reason and "2000" in reason
    assert_others_are_served(server, connect)
    lines = [line for line in server.stderr().splitlines() if "websocket close 1009" in line]
    assert len(lines) == 1 and f"user={user}" in lines[0], lines
    assert f"{len(message)} bytes" in lines[0] or f"{len(message) + 2} bytes" in lines[0], lines
    assert "socket shutdown error" not in server.stderr()


def test_an_oversized_long_polling_post_is_logged_with_its_size(start_server, connect):
    server = start_server(env={"MAX_PAYLOAD_BYTES": "2000"})
    user = new_user_id()
    sender = connect(user, on=server, transports=("polling",))
    sender.client.emit("message", {"room": "r", "text": "x" * 5000})
    server.wait_for_log(rf"closing sid={sender.sid} user={user}: a long-polling POST of \d+ bytes"
                        r" is above the limit of 2000")
    server.wait_for_log(rf"disconnect sid={sender.sid} user={user}")
    assert_others_are_served(server, connect)


BAD_INPUTS = [None, 0, -1, 1.5, True, "", "x" * 50_000, [], [1, "a", None], {"a": {"b": [{}]}},
              {"room": {"nested": ["junk"]}, "text": ["x"], "items": {"0": 1}, "total": [],
               "toUserId": {}, "orderId": [], "status": {}, "meta": 5}]


@pytest.mark.parametrize("event", ["joinRoom", "leaveRoom", "message", "notification:send",
                                   "order:create", "order:updateStatus", "typing"])
def test_bad_input_gets_an_error_ack_and_the_connection_survives(connect, event):
    user = new_user_id()
    tab = connect(user)
    for payload in BAD_INPUTS:
        ack = tab.call(event, payload)
        assert isinstance(ack, dict) and ack.get("error") not in (None, "Internal error"), \
            (event, payload, ack)
    assert tab.call("whoami")["userId"] == user


def test_the_polling_transport_serves_the_same_protocol(connect):
    user, room = new_user_id(), new_user_id("room")
    tab = connect(user, transports=("polling",))
    assert tab.call("whoami")["userId"] == user
    tab.call("joinRoom", room)
    assert tab.call("message", {"room": room, "text": "over polling"})["ok"]
    assert tab.wait_for("message")["text"] == "over polling"
    assert tab.call("order:create", EXAMPLE_ORDER)["ok"]
    tab.wait_for("order:created")


def test_the_readme_flow_runs_on_the_official_javascript_client(start_server):
    """examples/flow.mjs is the README's whole-flow script, run by socket.io-client 4."""
    script = SERVER.parent / "examples" / "flow.mjs"
    assert script.read_text() in (SERVER.parent / "README.md").read_text()
    server = start_server(env={"JWT_SECRET": None})
    done = subprocess.run(["node", str(script), server.url], cwd=script.parent, text=True,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for line in ["whoami { userId: 'alice', role: 'user', email: null, isVerified: false }",
                 "message { ok: true, sentTo: 'room:lobby' }", "paid paid", "shipped shipped"]:
        assert line in done.stdout.splitlines(), done.stdout
    for pattern in (r"^created [0-9a-f]{24} pending$", r"^admin ← message lobby: hi @ ",
                    r"^alice ← sync: replayed 4, complete true @ ",
                    r"^bob ← notification:received Hi: Test @ "):
        assert re.search(pattern, done.stdout, re.MULTILINE), (pattern, done.stdout)


def test_websocket_compression_is_declined(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(
            b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
            + f"Host: {host}:{port}\r\n".encode()
            + b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n")
        response = raw.recv(4096).decode("latin-1")
    assert response.startswith("HTTP/1.1 101")
    assert "sec-websocket-extensions" not in response.lower()


def test_a_long_polling_batch_of_many_packets_is_answered_in_full(server):
    """python-engineio drops batches of more than 16 packets unless told otherwise."""
    base = server.url + "/socket.io/?EIO=4&transport=polling"
    session = requests.Session()
    sid = json.loads(session.get(base).text[1:])["sid"]
    url = f"{base}&sid={sid}"
    session.post(url, data="40")
    session.get(url)
    batch = "\x1e".join(f'42{n}["joinRoom","room-{n}"]' for n in range(40))
    assert session.post(url, data=batch).status_code == 200
    acks = []
    deadline = time.monotonic() + 5
    while len(acks) < 40 and time.monotonic() < deadline:
        acks += [p for p in session.get(url).text.split("\x1e") if p.startswith("43")]
    assert len(acks) == 40
