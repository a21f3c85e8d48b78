"""Shop Realtime: a Socket.IO server for an e-commerce real-time protocol.

Rooms and chat, presence, personal notifications, orders with status changes
and stock updates, over python-socketio hosted by eventlet, stored in SQLite.
The protocol is the one README.md describes. This file reads top to bottom:

    settings -> the Socket.IO server and its rules -> the events, in protocol
    order -> the shop that holds a running server -> notification worker ->
    presence -> storage -> auth -> validation and the order rules -> packets
    and transports -> speed-ups over the libraries -> HTTP routes -> command line

Several processes through Redis live in cluster.py, imported only with
REDIS_URL. Run it with ``python server.py``; ``--help`` lists the options.
"""

import sys
import warnings

# eventlet says on import that it is in maintenance mode; README.md says so once.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
if __name__ == "__main__":
    # As a program, eventlet patches the standard library before anything else
    # imports it. Imported as a module (the unit tests), server.py patches nothing.
    import eventlet

    eventlet.monkey_patch()

import argparse
import base64
import bisect
import errno
import fcntl
import functools
import io
import ipaddress
import itertools
import json
import logging
import math
import mimetypes
import os
import re
import secrets
import signal
import socket
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import engineio
import eventlet
import eventlet.hubs
import eventlet.queue
import eventlet.tpool
import eventlet.websocket
import eventlet.wsgi
import jwt
import socketio
from engineio.async_drivers import eventlet as engineio_eventlet
from engineio.payload import Payload

# =============================================================================
# Settings
# =============================================================================

HERE = Path(__file__).resolve().parent
SCHEMA_FILE = HERE / "schema.sql"
TESTER_FILE = HERE / "ws-tester.html"
ASYNCAPI_FILE = HERE / "asyncapi.json"     # the protocol as an AsyncAPI 3 document
# The pinned socket.io-client browser build, shipped in vendor/ so that the
# tester works offline from pip alone; the Admin UI comes with `npm ci`.
CLIENT_SCRIPT = HERE / "vendor" / "socket.io.min.js"
ADMIN_UI_DIR = HERE / "node_modules" / "@socket.io" / "admin-ui" / "ui" / "dist"
CLIENT_SCRIPT_URL = "/vendor/socket.io.min.js"
ADMIN_UI_URL = "/admin-ui/"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_DATABASE = "app.db"
DEFAULT_MAX_PAYLOAD_BYTES = 100_000
DEFAULT_TOKEN_TTL = "24h"
DEFAULT_CONNECT_TIMEOUT_S = 45.0   # Engine.IO open, no Socket.IO CONNECT: closed (as socket.io)
SECRET_SUFFIX = ".secret"
SQLITE_BUSY_TIMEOUT_MS = 5000
CHECKPOINT_INTERVAL_S = 0.5        # how often the WAL is copied into the database file
MAX_CONNECTIONS = 100_000          # eventlet's WSGI server would stop at 1024
LISTEN_BACKLOG = 1024
SHUTDOWN_POLL_S = 0.2
SHUTDOWN_FLUSH_S = 0.3             # lets writer greenlets send the last emits

# Protocol limits (README "WebSocket API").
ROOM_MAX = 64
TEXT_MAX = 2000
META_MAX_BYTES = 4096
TITLE_MAX = 200
BODY_MAX = 2000
USER_ID_MAX = 128
ITEMS_MAX = 100
IDEMPOTENCY_KEY_MAX = 64
PAYMENT_METHOD_MAX = 64
SHIPPING_ADDRESS_MAX_BYTES = 4096
SHOWN_VALUE_MAX = 100              # longest client value echoed in an error

ADMIN_ROOMS = ("admin", "admins")
NOTIFICATION_TYPES = ("info", "warning", "error")
PRIORITIES = ("low", "normal", "high")
STATUSES = ("pending", "paid", "shipped", "completed", "cancelled")
TRANSITIONS = {
    "pending": {"paid", "cancelled"},
    "paid": {"shipped", "cancelled"},
    "shipped": {"completed"},
    "completed": set(),
    "cancelled": set(),
}
OWNER_MAY_SET = {"paid", "cancelled"}

# Token buckets: event -> (events, window in seconds). "*" is every other event.
DEFAULT_RATE_LIMITS: dict[str, tuple[int, float]] = {
    "message": (20, 10.0),
    "typing": (20, 10.0),
    "notification:send": (10, 10.0),
    "order:create": (5, 10.0),
    "*": (50, 10.0),
}
ACK_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

log = logging.getLogger("shop")


class ConfigError(Exception):
    """A setting the server cannot run with; main() prints it and exits 2."""


@dataclass(frozen=True)
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    database: Path = Path(DEFAULT_DATABASE)
    jwt_secret: str | None = None            # None: the dev secret in <db>.secret
    redis_url: str | None = None
    cors_origins: str | list[str] = "*"
    require_auth: bool = False
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    rate_limits: dict[str, tuple[int, float]] | None = field(
        default_factory=lambda: dict(DEFAULT_RATE_LIMITS))
    notify_queue: bool = True
    admin_ui: tuple[str, str] | None = None
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    allowed_hosts: tuple[str, ...] = ()      # host names that may ask for dev tokens
    verbose: bool = False


def load_config(args: argparse.Namespace, env: Mapping[str, str]) -> Config:
    """Flags win over environment variables, which win over defaults."""
    max_payload = env.get("MAX_PAYLOAD_BYTES", str(DEFAULT_MAX_PAYLOAD_BYTES))
    if not max_payload.isdigit() or int(max_payload) < 1000:
        raise ConfigError(f"MAX_PAYLOAD_BYTES must be a whole number >= 1000, got {max_payload!r}")
    admin_ui = None
    if env.get("ADMIN_UI"):
        user, colon, password = env["ADMIN_UI"].partition(":")
        if not (user and colon and password):
            raise ConfigError("ADMIN_UI must be user:password")
        admin_ui = (user, password)
    origins = env.get("CORS_ORIGINS", "*").strip() or "*"
    try:
        connect_timeout = parse_duration(env.get("CONNECT_TIMEOUT",
                                                 f"{DEFAULT_CONNECT_TIMEOUT_S:g}s"))
    except ConfigError as error:
        raise ConfigError(f"CONNECT_TIMEOUT: {error}") from None
    return Config(
        host=getattr(args, "host", None) or env.get("HOST", DEFAULT_HOST),
        port=parse_port(str(args.port) if getattr(args, "port", None) is not None
                        else env.get("PORT", str(DEFAULT_PORT))),
        database=Path(getattr(args, "db", None) or env.get("DATABASE") or DEFAULT_DATABASE),
        jwt_secret=env.get("JWT_SECRET") or None,
        redis_url=env.get("REDIS_URL") or None,
        cors_origins="*" if origins == "*" else [o.strip() for o in origins.split(",")
                                                  if o.strip()],
        require_auth=getattr(args, "require_auth", False)
        or parse_flag("REQUIRE_AUTH", env.get("REQUIRE_AUTH", "0")),
        max_payload_bytes=int(max_payload),
        rate_limits=parse_rate_limits(env.get("RATE_LIMITS", "")),
        notify_queue=parse_flag("NOTIFY_QUEUE", env.get("NOTIFY_QUEUE", "1")),
        admin_ui=admin_ui,
        connect_timeout_s=connect_timeout,
        allowed_hosts=tuple(host_name(h.strip()) for h in env.get("ALLOWED_HOSTS", "").split(",")
                            if h.strip()),
        verbose=getattr(args, "verbose", False),
    )


def parse_port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ConfigError(f"port must be a number from 0 to 65535, got {text!r}")
    return int(text)


def parse_flag(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {text!r}")


def parse_duration(text: str) -> float:
    """'500ms', '10s', '5m', '24h', '7d' or plain seconds -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", text.strip())
    if not match or float(match[1]) <= 0:
        raise ConfigError(f"bad duration {text!r} (use e.g. 10s, 5m, 24h)")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2] or "s"]
    return float(match[1]) * scale


def parse_rate_limits(text: str) -> dict[str, tuple[int, float]] | None:
    """'message=20/10s,order:create=5/10s' over the defaults; 'off' for none."""
    if text.strip().lower() == "off":
        return None
    limits = dict(DEFAULT_RATE_LIMITS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"([\w:*]+)\s*=\s*(\d+)\s*/\s*(\S+)", part)
        if not match:
            raise ConfigError(f"RATE_LIMITS: {part!r} is not event=N/window (e.g. message=20/10s)")
        event_name, count, window = match[1], int(match[2]), match[3]
        if event_name not in EVENTS and event_name != "*":
            raise ConfigError(f"RATE_LIMITS: unknown event {event_name!r}")
        if count < 1:
            raise ConfigError(f"RATE_LIMITS: {event_name} needs at least 1 event per window")
        try:
            limits[event_name] = (count, parse_duration(window))
        except ConfigError as error:
            raise ConfigError(f"RATE_LIMITS: {error}") from None
    return limits


# =============================================================================
# The Socket.IO server and its rules
# =============================================================================
#
# One python-socketio Server (built by Shop, below, from the final settings)
# carries every event. Each client event has one small handler, registered
# with @event; `handle` applies what every event shares: the rate limit, one
# payload argument, the user requirement, refusals as error acks, and
# `Internal error` (with the traceback logged) for anything unexpected.

Ack = dict[str, Any]


class Refusal(Exception):
    """An expected failure. It becomes the ack {"error": message, **detail}."""

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.ack = {"error": message, **detail}


def invalid(detail: str) -> Refusal:
    return Refusal("Invalid payload", detail=detail)


def ok(**fields: Any) -> Ack:
    return {"ok": True, **fields}


@dataclass(frozen=True)
class User:
    id: str
    role: str = "user"
    email: str | None = None
    name: str | None = None
    is_verified: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass
class Peer:
    """One connected socket and who is behind it."""
    sid: str
    user: User | None
    why_anonymous: str = ""

    @property
    def rate_key(self) -> str:
        return f"user:{self.user.id}" if self.user else self.sid

    def public(self) -> dict | None:
        return {"id": self.user.id, "name": self.user.name} if self.user else None


class Context:
    """What a handler knows of its call, and what it may do. Its emits are
    sent after the ack (emit_after_ack), so a client always learns the
    outcome of its own request first."""

    def __init__(self, shop: "Shop", peer: Peer) -> None:
        self.shop, self.peer, self.sid, self.user = shop, peer, peer.sid, peer.user
        self.store, self.config = shop.store, shop.config
        self.after_ack: list[Callable[[], Any]] = []

    def emit_after_ack(self, event_name: str, data: dict, **target: Any) -> None:
        self.after_ack.append(functools.partial(self.shop.sio.emit, event_name, data, **target))

    def call_after_ack(self, task: Callable[..., Any], *args: Any) -> None:
        self.after_ack.append(functools.partial(task, *args))

    def in_room(self, room: str) -> bool:
        return self.shop.in_room(self.sid, room)

    def enter_room(self, room: str) -> None:
        self.shop.sio.enter_room(self.sid, room)

    def leave_room(self, room: str) -> None:
        self.shop.sio.leave_room(self.sid, room)

    def is_reserved_room(self, room: str) -> bool:
        """Rooms the server puts sockets in; joining one would let a client read
        what is meant for someone else."""
        return room in ADMIN_ROOMS or room.startswith("user:") \
            or self.shop.presence.is_socket(room)


Handler = Callable[[Context, Any], Ack]
EVENTS: dict[str, tuple[Handler, bool]] = {}   # event name -> (handler, user required)


def event(name: str, user_required: bool = False) -> Callable[[Handler], Handler]:
    """Register the handler of a client event; `handle` applies the shared rules."""
    def register(handler: Handler) -> Handler:
        EVENTS[name] = (handler, user_required)
        return handler
    return register


def handle(shop: "Shop", name: str, handler: Handler, user_required: bool, sid: str,
           args: tuple) -> Ack | None:
    """The rules every event shares (see the top of this section)."""
    peer = shop.peers.get(sid)
    if peer is None:          # the socket left while this was in flight
        return None
    started, context = time.perf_counter(), Context(shop, peer)
    try:
        shop.limiter.check(peer.rate_key, name)
        if len(args) > 1:
            raise invalid("send one payload argument")
        if user_required and peer.user is None:
            raise Refusal("Unauthorized", reason=peer.why_anonymous)
        ack = handler(context, args[0] if args else None)
    except Refusal as refusal:
        ack = refusal.ack
        level = logging.DEBUG if ack["error"] == "Rate limit exceeded" else logging.INFO
        log.log(level, "%s sid=%s user=%s -> %s", name, sid, user_of(peer), ack)
    except Exception:
        log.exception("%s sid=%s user=%s failed", name, sid, user_of(peer))
        ack = {"error": "Internal error"}
    else:
        log.debug("%s sid=%s user=%s -> ok", name, sid, user_of(peer))
        if context.after_ack:
            shop.send_after_ack(context.after_ack)
    shop.metrics.observe(name, time.perf_counter() - started, "error" in ack)
    return ack


def run_all(tasks: Iterable[Callable[[], Any]]) -> None:
    for task in tasks:
        try:
            task()
        except Exception:
            log.exception("emit after ack failed")


def user_of(peer: Peer | None) -> str:
    return peer.user.id if peer and peer.user else "-"


def order_rooms(order: dict) -> list[str]:
    """The owner's room and both admin rooms; a socket in several of them
    still receives the event once (python-socketio merges the rooms)."""
    return [f"user:{order['user']}", *ADMIN_ROOMS]


# =============================================================================
# The events, in protocol order
# =============================================================================

# -- connecting, identity and presence --------------------------------------------

def connect(shop: "Shop", sid: str, environ: dict, auth: Any) -> None:
    user, why = authenticate(handshake_token(environ, auth), shop.secret)
    if user is None and shop.config.require_auth:
        log.info("refused sid=%s reason=%s", sid, why)
        raise socketio.exceptions.ConnectionRefusedError("Unauthorized", {"reason": why})
    peer = shop.peers[sid] = Peer(sid, user, why)
    if user:
        shop.store.upsert_user(user)
        shop.sio.enter_room(sid, f"user:{user.id}")
        if user.is_admin:
            for room in ADMIN_ROOMS:
                shop.sio.enter_room(sid, room)
    first_tab = shop.presence.join(sid, user.id if user else None)
    log.info("connect sid=%s user=%s role=%s transport=%s", sid, user_of(peer),
             user.role if user else "anonymous", shop.sio.transport(sid))
    # The client hears of its connection only after this returns, so what it
    # must receive (presence, saved notifications) is sent by a task after it.
    shop.sio.start_background_task(welcome, shop, peer, first_tab)


def welcome(shop: "Shop", peer: Peer, first_tab: bool) -> None:
    if first_tab:
        shop.broadcast_presence([peer.user.id], "online")
    if peer.user:
        shop.notifier.replay(peer.user.id)


def connect_elsewhere(shop: "Shop", namespace: str, sid: str, environ: dict,
                      auth: Any = None) -> None:
    """The protocol lives in the default namespace alone."""
    raise socketio.exceptions.ConnectionRefusedError("Invalid namespace")


def disconnect(shop: "Shop", sid: str, reason: Any = None) -> None:
    peer = shop.peers.pop(sid, None)
    if peer is None:
        return
    log.info("disconnect sid=%s user=%s reason=%s", sid, user_of(peer), reason)
    last_tab = shop.presence.leave(sid, peer.user.id if peer.user else None)
    if peer.user is None or peer.user.id not in shop.presence.local:
        shop.limiter.forget(peer.rate_key)
    if last_tab:
        shop.broadcast_presence([peer.user.id], "offline")


# -- rooms and chat --------------------------------------------------------------

@event("joinRoom")
def join_room(ctx: Context, data: Any) -> Ack:
    room = room_name(data)
    if ctx.is_reserved_room(room):
        raise Refusal("Access denied")
    if not ctx.in_room(room):
        ctx.enter_room(room)
        ctx.emit_after_ack("joined", {"event": "joined", "room": room, "by": ctx.sid,
                                      "user": ctx.peer.public()}, to=room, skip_sid=ctx.sid)
    return ok(room=room)


@event("leaveRoom")
def leave_room(ctx: Context, data: Any) -> Ack:
    room = room_name(data)
    if ctx.is_reserved_room(room):
        raise Refusal("Access denied")
    if ctx.in_room(room):
        ctx.leave_room(room)
        ctx.emit_after_ack("left", {"event": "left", "room": room, "by": ctx.sid,
                                    "user": ctx.peer.public()}, to=room)
    return ok(room=room)


@event("message")
def message(ctx: Context, data: Any) -> Ack:
    data = as_object(data)
    room = room_name(data)
    text = data.get("text")
    if not isinstance(text, str):
        raise invalid("text must be a string")
    text = text.strip()
    if not 1 <= len(text) <= TEXT_MAX:
        raise invalid(f"text must be 1-{TEXT_MAX} characters")
    meta = optional_json_object(data, "meta", META_MAX_BYTES)
    if not ctx.in_room(room):
        raise Refusal("Not in room")
    payload = {"room": room, "text": text, "from": ctx.peer.public(), "ts": now_iso()}
    if meta is not None:
        payload["meta"] = meta
    ctx.emit_after_ack("message", payload, to=room)
    return ok(sentTo=f"room:{room}")


@event("whoami", user_required=True)
def whoami(ctx: Context, data: Any) -> Ack:
    user = ctx.user
    return {"userId": user.id, "role": user.role, "email": user.email,
            "isVerified": user.is_verified}


# -- notifications ---------------------------------------------------------------

@event("notification:send", user_required=True)
def notification_send(ctx: Context, data: Any) -> Ack:
    to_user_id, fields = parse_notification(data)
    note = ctx.store.save_notification(ctx.user, to_user_id, fields)   # saved before the ack
    if ctx.config.notify_queue:
        ctx.shop.notifier.queue.put((to_user_id, note))
    else:
        ctx.call_after_ack(ctx.shop.notifier.deliver, to_user_id, note)
    return ok(queued=ctx.config.notify_queue, saved=True, id=note["id"])


# -- orders ----------------------------------------------------------------------

@event("order:create", user_required=True)
def order_create(ctx: Context, data: Any) -> Ack:
    request = parse_order_request(data)
    with ctx.store.transaction():
        original = ctx.store.order_by_key(ctx.user.id, request.idempotency_key)
        if original is not None:                       # a retry: nothing new happens
            return ok(order=original, duplicate=True)
        check_order(request, ctx.store.catalogue(request.product_ids))
        order = ctx.store.insert_order(ctx.user, request)
    ctx.emit_after_ack("order:created", {"event": "order:created", "order": order},
                       to=order_rooms(order))
    return ok(order=order)


@event("order:updateStatus", user_required=True)
def order_update_status(ctx: Context, data: Any) -> Ack:
    data = as_object(data)
    order_id, status = object_id(data.get("orderId"), "_id"), data.get("status")
    with ctx.store.transaction():
        owner, current = ctx.store.order_status(order_id) or (None, None)
        if not check_status_change(ctx.user, owner, current, status):
            return ok(order=ctx.store.order(order_id))     # already there: a no-op
        stock_changes = []
        if sign := stock_movement(current, status):                # -1 taken, +1 given back
            moved = ctx.store.order_quantities(order_id)
            if sign < 0:
                check_stock(moved, ctx.store.catalogue(moved))
            stock_changes = ctx.store.add_stock(moved, sign)
        ctx.store.set_status(order_id, status)
        order = ctx.store.order(order_id)
    ctx.emit_after_ack("order:updated", {"event": "order:updated", "order": order},
                       to=order_rooms(order))
    for change in stock_changes:
        ctx.emit_after_ack("product:stockUpdated", {
            "event": "product:stockUpdated", "productId": change.product_id,
            "stock": change.stock, "delta": change.delta, "at": now_iso()})
    return ok(order=order)


# -- typing ----------------------------------------------------------------------

@event("typing", user_required=True)
def typing(ctx: Context, data: Any) -> Ack:
    data = as_object(data)
    to_user_id = user_id_field(data, "toUserId")
    has_room = data.get("room") is not None
    if (to_user_id is None) == (not has_room):
        raise invalid("send exactly one of toUserId or room")
    if to_user_id is not None:
        ctx.emit_after_ack("typing", {"event": "typing", "from": ctx.user.id, "at": now_iso()},
                           to=f"user:{to_user_id}")
        return ok(mode="personal")
    room = room_name(data)
    if not ctx.in_room(room):
        raise Refusal("Not in room")
    ctx.emit_after_ack("typing", {"event": "typing", "from": ctx.user.id, "room": room,
                                  "at": now_iso()}, to=room, skip_sid=ctx.sid)
    return ok(mode="room")


# -- everything else -------------------------------------------------------------

MALFORMED = "(malformed)"   # what LenientPacket makes of a packet it cannot decode


@event(MALFORMED)
def malformed(ctx: Context, why: Any) -> Ack:
    raise invalid(why)


def unknown_event(shop: "Shop", name: str, sid: str, *args: Any) -> Ack | None:
    """Without this catch-all python-socketio drops unknown events silently,
    and a client waiting for the ack would only ever see a timeout. They share
    the `*` rate limit and metrics label."""
    def refuse(ctx: Context, data: Any) -> Ack:
        raise Refusal(f"Unknown event: {name}")
    return handle(shop, "*", refuse, False, sid, args[:1])


# =============================================================================
# The shop: one running server, built once from the final settings
# =============================================================================

class Shop:
    """Everything a running server holds, made here and nowhere else: the
    Socket.IO server with its settings and handlers, the storage, presence,
    rate limits, metrics, the notification worker and the WSGI app. Building
    it opens the database; `start` starts the background tasks."""

    def __init__(self, cfg: Config, secret: str) -> None:
        self.config, self.secret = cfg, secret
        self.peers: dict[str, Peer] = {}             # this process's sockets
        self.pending_emits: dict[Any, list[Callable[[], Any]]] = {}   # greenlet -> emits
        self.store = Storage(cfg.database)
        if cfg.redis_url:
            try:
                import cluster  # Redis, and this module, only for several processes
            except ImportError:
                raise ConfigError("REDIS_URL needs the redis package:"
                                  " pip install -r requirements-redis.txt") from None
            self.presence: Presence = cluster.Cluster(cfg.redis_url, self.peers)
            manager = socketio.RedisManager(cfg.redis_url)
        else:
            self.presence, manager = Presence(self.peers), None
        self.limiter = RateLimiter(cfg.rate_limits, self.presence)
        self.metrics = Metrics()
        self.sio = Server(
            self, async_mode="eventlet", client_manager=manager,
            cors_allowed_origins=cfg.cors_origins, max_http_buffer_size=cfg.max_payload_bytes,
            serializer=LenientPacket, json=PacketJSON, logger=False, engineio_logger=False,
            # Every namespace reaches connect_elsewhere, which refuses it.
            namespaces="*",
            # Each socket's events run in its own connection's greenlet, one after
            # the other in the order sent (as socket.io does), not in a new greenlet
            # each: see "Speed-ups over the libraries".
            async_handlers=False)
        self.sio.on("connect", functools.partial(connect, self))
        self.sio.on("disconnect", functools.partial(disconnect, self))
        self.sio.on("connect", functools.partial(connect_elsewhere, self), namespace="*")
        for name, (handler, user_required) in EVENTS.items():
            self.sio.on(name, functools.partial(self.dispatch, name, handler, user_required))
        self.sio.on("*", functools.partial(unknown_event, self))
        if cfg.admin_ui:
            self.sio.instrument(auth={"username": cfg.admin_ui[0], "password": cfg.admin_ui[1]})
        self.notifier = Notifier(self)
        self.app = transports(self, socketio.WSGIApp(self.sio, functools.partial(http_app, self)))

    def dispatch(self, name: str, handler: Handler, user_required: bool, sid: str,
                 *args: Any) -> Ack | None:
        return handle(self, name, handler, user_required, sid, args)

    def send_after_ack(self, emits: list[Callable[[], Any]]) -> None:
        """Leave a handler's emits for Server to send right after the ack."""
        self.pending_emits[eventlet.getcurrent()] = emits

    def in_room(self, sid: str, room: str) -> bool:
        return room in self.sio.rooms(sid)

    def broadcast_presence(self, user_ids: list[str], status: str) -> None:
        for user_id in user_ids:
            self.sio.emit("presence:update", {"userId": user_id, "status": status,
                                              "at": now_iso()})

    def start(self) -> None:
        self.notifier.start()
        self.store.start_checkpoints()
        self.presence.start(self.sio.start_background_task, self.broadcast_presence)

    def stop(self) -> None:
        """Deliver what is queued, leave the cluster, let the last emits go out,
        and close the database (which checkpoints and removes the WAL)."""
        self.notifier.stop()
        self.presence.stop()
        eventlet.sleep(SHUTDOWN_FLUSH_S)
        self.store.close()


# =============================================================================
# Notification worker
# =============================================================================

class Notifier:
    """Notifications are saved before they are acked; this greenlet then hands
    them to live connections. Each is claimed in SQLite before it is emitted,
    so the worker and the replay on connect never deliver one twice."""

    STOP = object()

    def __init__(self, shop: Shop) -> None:
        self.shop = shop
        self.queue: eventlet.queue.Queue = eventlet.queue.Queue()
        self.worker: Any = None

    def start(self) -> None:
        self.worker = self.shop.sio.start_background_task(self.run)

    def run(self) -> None:
        while (item := self.queue.get()) is not self.STOP:
            to_user_id, note = item
            try:
                self.deliver(to_user_id, note)
            except Exception:
                log.exception("delivering notification %s failed; it stays saved", note["id"])

    def deliver(self, to_user_id: str, note: dict) -> None:
        """Emit to a live recipient; an offline one gets it on its next connect."""
        if self.shop.presence.is_online(to_user_id) and self.shop.store.mark_delivered(note["id"]):
            self.shop.sio.emit("notification:received", note, to=f"user:{to_user_id}")

    def replay(self, user_id: str) -> None:
        for note in self.shop.store.claim_undelivered(user_id):
            self.shop.sio.emit("notification:received", note, to=f"user:{user_id}")

    def stop(self) -> None:
        """Deliver what is queued, then end the worker."""
        if self.worker is not None:
            self.queue.put(self.STOP)
            self.worker.join()
            self.worker = None


# =============================================================================
# Presence, rate limits and metrics
# =============================================================================

class Presence:
    """Who is online and which socket ids exist, in this one process. With
    REDIS_URL, cluster.Cluster takes its place, with the same methods, and
    shares all of it (and the rate-limit buckets) between processes."""

    def __init__(self, peers: dict[str, Peer]) -> None:
        self.peers = peers
        self.local: Counter[str] = Counter()       # user id -> live connections

    def start(self, spawn: Callable, announce: Callable[[list[str], str], None]) -> None:
        pass                                       # nothing runs in the background

    def join(self, sid: str, user_id: str | None) -> bool:
        """Count a new connection; True when it is the user's first."""
        if user_id is None:
            return False
        self.local[user_id] += 1
        return self.local[user_id] == 1

    def leave(self, sid: str, user_id: str | None) -> bool:
        """Count a closed connection; True when it was the user's last."""
        if user_id is None:
            return False
        self.local[user_id] -= 1
        if self.local[user_id] > 0:
            return False
        del self.local[user_id]
        return True

    def is_online(self, user_id: str) -> bool:
        return user_id in self.local

    def is_socket(self, name: str) -> bool:
        """A socket id: Socket.IO keeps a private room under it."""
        return name in self.peers

    def users_online(self) -> int:
        return len(self.local)

    def take_token(self, bucket: str, capacity: int, window_s: float) -> int | None:
        return None                                # the buckets are RateLimiter's own

    def stop(self) -> None:
        pass


class RateLimiter:
    """Token buckets per user (per socket for anonymous) and event; shared by
    every process through Redis when there is one (see cluster.py)."""

    def __init__(self, limits: dict[str, tuple[int, float]] | None, presence: Presence) -> None:
        self.limits, self.presence = limits, presence
        self.buckets: dict[str, dict[str, list[float]]] = defaultdict(dict)

    def check(self, who: str, event_name: str) -> None:
        """Take one token, or refuse with how long until the next one."""
        if self.limits is None:
            return
        name = event_name if event_name in self.limits else "*"
        capacity, window = self.limits[name]
        wait_ms = self.presence.take_token(f"{who}:{name}", capacity, window)
        if wait_ms is not None:                                   # shared through Redis
            if wait_ms > 0:
                raise Refusal("Rate limit exceeded", retryAfterMs=wait_ms)
            return
        rate = capacity / window                                  # tokens per second
        now = time.monotonic()
        tokens, last = self.buckets[who].get(name, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        if tokens < 1:
            self.buckets[who][name] = [tokens, now]
            raise Refusal("Rate limit exceeded", retryAfterMs=math.ceil((1 - tokens) / rate * 1000))
        self.buckets[who][name] = [tokens - 1, now]

    def forget(self, who: str) -> None:
        self.buckets.pop(who, None)


class Metrics:
    """Just enough of the Prometheus text format for /metrics."""

    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency = [0] * (len(ACK_LATENCY_BUCKETS_S) + 1)
        self.latency_sum = 0.0

    def observe(self, event_name: str, seconds: float, failed: bool) -> None:
        self.events[event_name] += 1
        self.errors[event_name] += failed
        self.latency_sum += seconds
        self.latency[bisect.bisect_left(ACK_LATENCY_BUCKETS_S, seconds)] += 1

    def render(self, shop: Shop) -> str:
        lines = ["# TYPE shop_connections gauge", f"shop_connections {len(shop.peers)}",
                 "# TYPE shop_users_online gauge",
                 f"shop_users_online {shop.presence.users_online()}",
                 "# TYPE shop_notifications_queued gauge",
                 f"shop_notifications_queued {shop.notifier.queue.qsize()}",
                 "# TYPE shop_events_total counter"]
        lines += [f'shop_events_total{{event="{e}"}} {n}' for e, n in sorted(self.events.items())]
        lines.append("# TYPE shop_event_errors_total counter")
        lines += [f'shop_event_errors_total{{event="{e}"}} {n}'
                  for e, n in sorted(self.errors.items())]
        lines.append("# TYPE shop_ack_latency_seconds histogram")
        for bound, count in zip((*ACK_LATENCY_BUCKETS_S, "+Inf"),
                                itertools.accumulate(self.latency)):
            lines.append(f'shop_ack_latency_seconds_bucket{{le="{bound}"}} {count}')
        lines += [f"shop_ack_latency_seconds_sum {self.latency_sum:.6f}",
                  f"shop_ack_latency_seconds_count {sum(self.latency)}"]
        return "\n".join(lines) + "\n"


# =============================================================================
# Storage
# =============================================================================

@dataclass(frozen=True)
class OrderRequest:
    items: list[tuple[str, int, int]]          # (product id, quantity, price in cents)
    total_cents: int
    shipping_address: dict | None = None
    payment_method: str | None = None
    idempotency_key: str | None = None

    @property
    def product_ids(self) -> set[str]:
        return {product_id for product_id, _, _ in self.items}


@dataclass(frozen=True)
class Product:
    price_cents: int
    stock: int


@dataclass(frozen=True)
class StockChange:
    product_id: str
    stock: int
    delta: int


class Storage:
    """All SQL lives here; the rules it serves are in "Validation and the
    order rules". Every write happens inside `transaction()`, which has
    committed by the time the handler acks or emits."""

    def __init__(self, path: Path, exclusive: bool = False) -> None:
        """Open (and create) the database. Every server holds a shared lock on
        the file while it runs; `reset` needs it exclusive, so it never pulls
        the data from under a running server."""
        self.path = path
        self.users_stored: dict[str, User] = {}
        self.checkpointer: Any = None
        self.stop_checkpoints: eventlet.queue.LightQueue = eventlet.queue.LightQueue()
        try:
            self.db = connect_database(path)
            self.file_lock = path.open("rb")
        except (sqlite3.Error, OSError) as error:
            raise ConfigError(f"cannot open database {str(path)!r}: {error}") from None
        try:
            fcntl.flock(self.file_lock, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                        | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file_lock.close()
            raise ConfigError(f"a server is running on {path}: stop it (Ctrl-C), then run"
                              " this again") from None
        self.db.row_factory = sqlite3.Row
        # WAL with synchronous=NORMAL: a commit survives a killed process
        # (not a power cut) and readers never wait for the writer.
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("PRAGMA wal_autocheckpoint = 0")     # see checkpoint_forever
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.executescript(SCHEMA_FILE.read_text(encoding="utf-8"))

    def start_checkpoints(self) -> None:
        self.checkpointer = eventlet.spawn(self.checkpoint_forever)

    def checkpoint_forever(self) -> None:
        """Copy committed pages from the WAL back into the database file. The
        copy ends in two fsyncs that take milliseconds, and SQLite would make
        every few hundredth commit wait for them with the whole process (and
        every socket) stopped. Done here, in a native thread (eventlet.tpool),
        the greenlets go on meanwhile."""
        connection = connect_database(self.path)
        try:
            while True:
                try:
                    self.stop_checkpoints.get(timeout=CHECKPOINT_INTERVAL_S)
                    return
                except eventlet.queue.Empty:
                    pass
                try:
                    eventlet.tpool.execute(
                        lambda: connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())
                except Exception:  # keep checkpointing: without them the WAL only grows
                    log.exception("checkpoint failed; the WAL keeps the data until the next one")
        finally:
            connection.close()

    def close(self) -> None:
        """Stop the checkpoints, then close: the last connection to close
        checkpoints what is left and removes the WAL."""
        if self.checkpointer is not None:
            self.stop_checkpoints.put(None)
            self.checkpointer.wait()
            self.checkpointer = None
        if self.db is not None:
            self.db.close()
            self.db = None
            self.file_lock.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE takes the write lock up front, so two requests
        (or two processes) can never both read the same stock and act on it."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- users and products ---------------------------------------------------

    def upsert_user(self, user: User) -> None:
        """Store the identity a token claims; an identity this process has
        stored already is not written again."""
        if self.users_stored.get(user.id) == user:
            return
        self.users_stored[user.id] = user
        stamp = now_iso()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO users (id, role, email, name, is_verified, created_at, seen_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " role = excluded.role, email = excluded.email, name = excluded.name,"
                " is_verified = excluded.is_verified, seen_at = excluded.seen_at",
                (user.id, user.role, user.email, user.name, int(user.is_verified), stamp, stamp))

    def products(self) -> list[dict]:
        rows = self.db.execute("SELECT id, name, price_cents, stock FROM products ORDER BY id")
        return [{"_id": r["id"], "name": r["name"], "price": from_cents(r["price_cents"]),
                 "stock": r["stock"]} for r in rows]

    def catalogue(self, product_ids: Iterable[str]) -> dict[str, Product]:
        """The listed products that exist, with their price and stock."""
        ids = list(product_ids)
        rows = self.db.execute(
            f"SELECT id, price_cents, stock FROM products WHERE id IN ({','.join('?' * len(ids))})",
            ids)
        return {row["id"]: Product(row["price_cents"], row["stock"]) for row in rows}

    def add_stock(self, quantities: Mapping[str, int], sign: int) -> list[StockChange]:
        """Take (sign -1) or give back (+1) each product's quantity. The schema's
        CHECK (stock >= 0) would refuse an oversell even if a rule were skipped."""
        changes = []
        for product_id, quantity in quantities.items():
            row = self.db.execute("UPDATE products SET stock = stock + ? WHERE id = ?"
                                  " RETURNING stock", (sign * quantity, product_id)).fetchone()
            changes.append(StockChange(product_id, row["stock"], sign * quantity))
        return changes

    # -- orders -----------------------------------------------------------------

    def order_by_key(self, user_id: str, idempotency_key: str | None) -> dict | None:
        """The order a retry with the same key already created, if any."""
        if idempotency_key is None:
            return None
        row = self.db.execute("SELECT id FROM orders WHERE user_id = ? AND idempotency_key = ?",
                              (user_id, idempotency_key)).fetchone()
        return self.order(row["id"]) if row else None

    def insert_order(self, user: User, request: OrderRequest) -> dict:
        """Write a pending order and its items; returns it without reading it back."""
        order_id, stamp = new_object_id(), now_iso()
        self.db.execute(
            "INSERT INTO orders (id, user_id, status, total_cents, shipping_address,"
            " payment_method, idempotency_key, created_at, updated_at)"
            " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
            (order_id, user.id, request.total_cents,
             None if request.shipping_address is None else json.dumps(request.shipping_address),
             request.payment_method, request.idempotency_key, stamp, stamp))
        self.db.executemany(
            "INSERT INTO order_items (order_id, position, product_id, quantity, price_cents)"
            " VALUES (?, ?, ?, ?, ?)",
            [(order_id, n, *item) for n, item in enumerate(request.items)])
        return {
            "_id": order_id, "user": user.id,
            "items": [{"product": product_id, "quantity": quantity, "price": from_cents(price)}
                      for product_id, quantity, price in request.items],
            "shippingAddress": request.shipping_address, "paymentMethod": request.payment_method,
            "total": from_cents(request.total_cents), "status": "pending",
            "createdAt": stamp, "updatedAt": stamp,
        }

    def order_status(self, order_id: str) -> tuple[str, str] | None:
        """(owner, status) of an order, or None if there is none."""
        row = self.db.execute("SELECT user_id, status FROM orders WHERE id = ?",
                              (order_id,)).fetchone()
        return (row["user_id"], row["status"]) if row else None

    def set_status(self, order_id: str, status: str) -> None:
        self.db.execute("UPDATE orders SET status = ?, updated_at = ? WHERE id = ?",
                        (status, now_iso(), order_id))

    def order_quantities(self, order_id: str) -> dict[str, int]:
        items = self.db.execute("SELECT product_id, quantity, price_cents FROM order_items"
                                " WHERE order_id = ? ORDER BY position", (order_id,)).fetchall()
        return quantities(items)

    def order(self, order_id: str) -> dict:
        """The order in the Mongo-style JSON shape the original backend returned."""
        order = self.db.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
        items = self.db.execute(
            "SELECT product_id, quantity, price_cents FROM order_items WHERE order_id = ?"
            " ORDER BY position", (order_id,))
        return {
            "_id": order["id"],
            "user": order["user_id"],
            "items": [{"product": i["product_id"], "quantity": i["quantity"],
                       "price": from_cents(i["price_cents"])} for i in items],
            "shippingAddress": json.loads(order["shipping_address"] or "null"),
            "paymentMethod": order["payment_method"],
            "total": from_cents(order["total_cents"]),
            "status": order["status"],
            "createdAt": order["created_at"],
            "updatedAt": order["updated_at"],
        }

    # -- notifications ------------------------------------------------------------

    def save_notification(self, sender: User, to_user_id: str, fields: dict) -> dict:
        """Write the notification and return it as the recipient will see it."""
        with self.transaction() as db:
            row = db.execute(
                "INSERT INTO notifications (id, to_user_id, from_user_id, type, priority,"
                " title, body, meta, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (new_object_id(), to_user_id, sender.id, fields["type"], fields["priority"],
                 fields["title"], fields["body"],
                 None if fields["meta"] is None else json.dumps(fields["meta"]),
                 now_iso())).fetchone()
        return notification_received(row)

    def mark_delivered(self, notification_id: str) -> bool:
        """Claim one notification for delivery; False if it was claimed already."""
        with self.transaction() as db:
            return db.execute(
                "UPDATE notifications SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL",
                (now_iso(), notification_id)).rowcount == 1

    def claim_undelivered(self, user_id: str) -> list[dict]:
        """Claim everything still waiting for a user, oldest first."""
        if not self.db.execute("SELECT 1 FROM notifications WHERE to_user_id = ?"
                               " AND delivered_at IS NULL LIMIT 1", (user_id,)).fetchone():
            return []  # the common case: a read, no write lock
        with self.transaction() as db:
            rows = db.execute(
                "SELECT * FROM notifications WHERE to_user_id = ? AND delivered_at IS NULL"
                " ORDER BY created_at, rowid", (user_id,)).fetchall()
            db.executemany("UPDATE notifications SET delivered_at = ? WHERE id = ?",
                           [(now_iso(), row["id"]) for row in rows])
        return [notification_received(row) for row in rows]

    # -- a fresh workshop -----------------------------------------------------------

    def reset(self) -> dict[str, int]:
        """No orders, notifications or users, and the demo catalogue at its
        seeded stock and prices. Returns the rows removed."""
        with self.transaction() as db:
            removed = {table: db.execute(f"DELETE FROM {table}").rowcount
                       for table in ("order_items", "orders", "notifications", "users")}
            db.execute(
                "INSERT INTO products (id, name, price_cents, stock)"
                " SELECT id, name, price_cents, stock FROM demo_catalogue WHERE true"
                " ON CONFLICT (id) DO UPDATE SET name = excluded.name,"
                " price_cents = excluded.price_cents, stock = excluded.stock")
        return removed


def connect_database(path: Path) -> sqlite3.Connection:
    """Autocommit mode (transactions are explicit), usable from the checkpoint
    thread, and waiting for other processes' locks (they may share the file)."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    return connection


def notification_received(row: sqlite3.Row) -> dict:
    """The `notification:received` payload of a stored notification."""
    return {"event": "notification:received", "id": row["id"], "type": row["type"],
            "title": row["title"], "body": row["body"], "meta": json.loads(row["meta"] or "null"),
            "priority": row["priority"], "from": row["from_user_id"], "ts": row["created_at"]}


def quantities(items: Iterable) -> dict[str, int]:
    """Quantity per product, so a product listed twice moves stock once."""
    total: Counter[str] = Counter()
    for product_id, quantity, _ in items:
        total[product_id] += quantity
    return dict(total)


def now_iso() -> str:
    """The time as JavaScript's Date.toISOString() writes it."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


_object_id_random = secrets.token_bytes(5)
_object_id_counter = itertools.count(secrets.randbelow(1 << 24))


def new_object_id() -> str:
    """A MongoDB-style ObjectId: 4-byte seconds, 5 random bytes, 3-byte counter."""
    counter = next(_object_id_counter) & 0xFFFFFF
    return (int(time.time()).to_bytes(4, "big") + _object_id_random
            + counter.to_bytes(3, "big")).hex()


def to_cents(amount: float) -> int:
    """Money is compared in whole cents, never as floats. Any finite number
    has its cents, 1e308 too (to_integral_value has no precision limit)."""
    if isinstance(amount, int):
        return amount * 100
    return int((Decimal(repr(amount)) * 100).to_integral_value(rounding=ROUND_HALF_UP))


def from_cents(cents: int) -> int | float:
    return cents // 100 if cents % 100 == 0 else cents / 100


# =============================================================================
# Auth
# =============================================================================

BEARER = re.compile(r"^\s*bearer\s+", re.IGNORECASE)
ID_CLAIMS = ("sub", "id", "userId", "_id")


def secret_file(database: Path) -> Path:
    return database.with_name(database.name + SECRET_SUFFIX)


def load_secret(cfg: Config, create: bool = True) -> str:
    """JWT_SECRET, or a random dev secret created once beside the database
    (by the server; `token` only reads it, see existing_secret)."""
    if cfg.jwt_secret:
        if len(cfg.jwt_secret.encode()) < 32:
            log.warning("JWT_SECRET is shorter than 32 bytes; use a longer random secret")
        return cfg.jwt_secret
    path = secret_file(cfg.database)
    if not create:
        return existing_secret(path, cfg.database)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(f"cannot create the dev secret {path}: {error.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(secrets.token_urlsafe(48) + "\n")
    return path.read_text(encoding="utf-8").strip()


def existing_secret(path: Path, database: Path) -> str:
    """The dev secret a server made for this database. A new one would sign
    tokens that no running server accepts, so none is made here."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"no dev secret at {path.resolve()}: a server makes it on its first start"
                          f" with --db {database}; start it once, pass the --db the server uses,"
                          " or set JWT_SECRET") from None
    except OSError as error:
        raise ConfigError(f"cannot read the dev secret {path}: {error.strerror}") from None


def issue_token(secret: str, user_id: str, role: str = "user", email: str | None = None,
                name: str | None = None, ttl_s: float = 86400) -> str:
    claims: dict[str, Any] = {"sub": user_id, "role": role, "iat": int(time.time()),
                              "exp": int(time.time() + ttl_s)}
    if email:
        claims["email"] = email
    if name:
        claims["name"] = name
    return "Bearer " + jwt.encode(claims, secret, algorithm="HS256")


def authenticate(token: Any, secret: str) -> tuple[User | None, str]:
    """(user, "") for a good token, else (None, why): no token, token expired
    or invalid token. HS256 is pinned, so `alg: none` and RS/HS confusion fail."""
    token = BEARER.sub("", token).strip() if isinstance(token, str) else token
    if token is None or token == "":
        return None, "no token"
    if not isinstance(token, str) or UNSAFE_CHARACTER.search(token):
        return None, "invalid token"
    try:
        with warnings.catch_warnings():
            # PyJWT warns on every decode with a short key; load_secret warned once.
            warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
            claims = jwt.decode(
                token, secret, algorithms=["HS256"], leeway=30,
                # The id claim is checked below: PyJWT would refuse a numeric `sub`,
                # and tokens of an existing backend may carry an audience we don't know.
                options={"verify_sub": False, "verify_jti": False, "verify_aud": False})
    except jwt.ExpiredSignatureError:
        return None, "token expired"
    except jwt.InvalidTokenError:
        return None, "invalid token"
    user_id = next((claims[k] for k in ID_CLAIMS if claims.get(k) not in (None, "")), None)
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if not isinstance(user_id, str) or len(user_id) > USER_ID_MAX:
        return None, "invalid token"
    email, name = text_claim(claims, "email"), text_claim(claims, "name")
    if any(UNSAFE_CHARACTER.search(text) for text in (user_id, email or "", name or "")):
        return None, "invalid token"   # claims that could not be stored or shown
    return User(id=user_id, role="admin" if claims.get("role") == "admin" else "user",
                email=email, name=name, is_verified=claims.get("isVerified") is True), ""


def text_claim(claims: dict, key: str) -> str | None:
    return claims[key] if isinstance(claims.get(key), str) else None


def handshake_token(environ: dict, auth: Any) -> Any:
    """The handshake `auth.token`, else an Authorization header (non-browser
    clients). A token in the query string is ignored on purpose: URLs are logged."""
    if isinstance(auth, dict) and auth.get("token") is not None:
        return auth["token"]
    return environ.get("HTTP_AUTHORIZATION")


# =============================================================================
# Validation and the order rules
# =============================================================================

OBJECT_ID = re.compile(r"[0-9a-fA-F]{24}")
# Characters no string of the protocol may hold: NUL, which SQLite and C code
# take for the end of a string, and a lone UTF-16 surrogate (half an emoji, as
# JavaScript's slice() can cut one), which JSON can carry but UTF-8 cannot.
UNSAFE_CHARACTER = re.compile("[\x00\ud800-\udfff]")
# JSON carries either only as an escape (\u0000, \ud800); raw, JSON refuses NUL
# and UTF-8 has no surrogates. Packets without a backslash-u need no search.
MAYBE_UNSAFE = re.compile(r"\\u|[\x00\ud800-\udfff]")


def unsafe_text(value: Any, path: str = "") -> str | None:
    """Why a decoded payload cannot be taken, naming the field, or None.
    Iterative: the payload may be nested as deep as the JSON decoder allows."""
    pending = [(path, value)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            found = UNSAFE_CHARACTER.search(value)
            if found:
                what = ("a NUL character" if found[0] == "\x00"
                        else "a lone UTF-16 surrogate (half of a character)")
                return f"{path or 'the payload'} contains {what}"
        elif isinstance(value, dict):
            for key, item in value.items():
                pending.append((f"a key of {path or 'the payload'}", key))
                pending.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list):
            pending.extend((f"{path}.{n}" if path else str(n), item)
                           for n, item in enumerate(value))
    return None


def shown(value: Any) -> str:
    """A client value as an error message quotes it (shortened)."""
    if value is None:
        return "undefined"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= SHOWN_VALUE_MAX else text[:SHOWN_VALUE_MAX] + "…"


def as_object(data: Any) -> dict:
    if not isinstance(data, dict):
        raise invalid("payload must be an object")
    return data


def is_number(value: Any) -> bool:
    """A finite JSON number; booleans are not numbers."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def optional_text(data: dict, key: str, limit: int) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{key} must be a string")
    if len(value) > limit:
        raise invalid(f"{key} must be at most {limit} characters")
    return value


def optional_json_object(data: dict, key: str, limit_bytes: int) -> dict | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(f"{key} must be an object")
    try:
        encoded = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN or Infinity, which Python reads and JSON.parse does not
        raise invalid(f"{key} must be plain JSON (no binary data, NaN or Infinity)") from None
    if len(encoded.encode()) > limit_bytes:
        raise invalid(f"{key} must be at most {limit_bytes} bytes as JSON")
    return value


def user_id_field(data: dict, key: str) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > USER_ID_MAX:
        raise invalid(f"{key} must be a string of at most {USER_ID_MAX} characters")
    return value


def room_name(data: Any) -> str:
    """joinRoom/leaveRoom take "room" or {"room": "room"}."""
    value = data.get("room") if isinstance(data, dict) else data
    if not isinstance(value, str):
        raise invalid("room must be a string")
    room = value.strip()
    if not 1 <= len(room) <= ROOM_MAX:
        raise invalid(f"room must be 1-{ROOM_MAX} characters")
    return room


def object_id(value: Any, path: str) -> str:
    if not isinstance(value, str) or not OBJECT_ID.fullmatch(value):
        raise Refusal(f'Cast to ObjectId failed for value "{shown(value)}" at path "{path}"')
    return value.lower()


def parse_order_request(data: Any) -> OrderRequest:
    """order:create's checks, first failure wins, in the order of the protocol."""
    data = as_object(data)
    raw_items = data.get("items")
    if not isinstance(raw_items, list) or not raw_items:
        raise Refusal("items must be a non-empty array")
    if len(raw_items) > ITEMS_MAX:
        raise Refusal("too many items")
    items = []
    for n, item in enumerate(raw_items):
        if not isinstance(item, dict):
            raise invalid(f"items.{n} must be an object")
        if item.get("product") is None:
            raise Refusal(f"items.{n}.product: Path 'product' is required")
        product = object_id(item["product"], f"items.{n}.product")
        if item.get("price") is None:
            raise Refusal(f"items.{n}.price: Path 'price' is required")
        if item.get("quantity") is None:
            raise Refusal(f"items.{n}.quantity: Path 'quantity' is required")
        quantity = item["quantity"]
        if not is_number(quantity) or quantity != int(quantity) or quantity < 1:
            raise Refusal(f"items.{n}.quantity must be a positive integer")
        price = item["price"]
        if not is_number(price) or price < 0:
            raise Refusal(f"items.{n}.price must be a non-negative number")
        items.append((product, int(quantity), to_cents(price)))
    total = data.get("total")
    if total is None:
        raise Refusal("total: Path 'total' is required")
    if not is_number(total):
        raise Refusal("total must be a number")
    key = data.get("idempotencyKey")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX):
        raise invalid(f"idempotencyKey must be a string of 1-{IDEMPOTENCY_KEY_MAX} characters")
    return OrderRequest(
        items=items, total_cents=to_cents(total),
        shipping_address=optional_json_object(data, "shippingAddress", SHIPPING_ADDRESS_MAX_BYTES),
        payment_method=optional_text(data, "paymentMethod", PAYMENT_METHOD_MAX),
        idempotency_key=key)


def parse_notification(data: Any) -> tuple[str, dict]:
    """(recipient, the notification's fields)."""
    data = as_object(data)
    to_user_id = data.get("toUserId")
    if not isinstance(to_user_id, str) or not to_user_id.strip():
        raise Refusal("toUserId is required")
    if len(to_user_id) > USER_ID_MAX:
        raise invalid(f"toUserId must be at most {USER_ID_MAX} characters")
    kind = data.get("type", "info")
    if kind not in NOTIFICATION_TYPES:
        raise Refusal("Invalid type")
    priority = data.get("priority", "normal")
    if priority not in PRIORITIES:
        raise Refusal("Invalid priority")
    return to_user_id, {"type": kind,
                        "title": optional_text(data, "title", TITLE_MAX),
                        "body": optional_text(data, "body", BODY_MAX),
                        "meta": optional_json_object(data, "meta", META_MAX_BYTES),
                        "priority": priority}


# -- the order rules, applied inside the order's transaction ---------------------

def check_order(request: OrderRequest, catalogue: Mapping[str, Product]) -> None:
    """order:create against the catalogue, first failure wins: every product
    exists, at its catalogue price; the total is their sum; there is stock."""
    for n, (product_id, _, price_cents) in enumerate(request.items):
        if product_id not in catalogue:
            raise Refusal(f"Product not found: {product_id}")
        if price_cents != catalogue[product_id].price_cents:
            raise Refusal(f"Price mismatch for items.{n} "
                          f"(catalogue price {from_cents(catalogue[product_id].price_cents)})")
    expected = sum(quantity * price for _, quantity, price in request.items)
    if request.total_cents != expected:
        raise Refusal(f"Total mismatch (expected {from_cents(expected)})")
    check_stock(quantities(request.items), catalogue)


def check_stock(wanted: Mapping[str, int], catalogue: Mapping[str, Product]) -> None:
    for product_id, quantity in wanted.items():
        if quantity > catalogue[product_id].stock:
            raise Refusal(f"Insufficient stock for product {product_id}")


def check_status_change(user: User, owner: str | None, current: str | None,
                        target: Any) -> bool:
    """order:updateStatus's rules, in the protocol's order. True when the
    status changes, False when the order already has it (a no-op)."""
    if owner is None:
        raise Refusal("Order not found")
    if not (user.is_admin or owner == user.id):
        raise Refusal("Access denied")
    if target not in STATUSES:
        raise Refusal("Invalid status")
    if target == current:
        return False
    if target not in TRANSITIONS[current]:
        raise Refusal(f"Invalid status transition: {current} -> {target}")
    if not user.is_admin and target not in OWNER_MAY_SET:
        raise Refusal("Access denied")
    return True


def stock_movement(current: str | None, target: str) -> int:
    """Stock moves exactly once: -1 (taken) entering paid, +1 (given back)
    from paid to cancelled, else 0."""
    if target == "paid":
        return -1
    return +1 if (current, target) == ("paid", "cancelled") else 0


# =============================================================================
# Speed-ups over the libraries
# =============================================================================
#
# Each stays because the benchmark shows it pays: `python bench/run.py --against
# REV` (README "Performance"), this server against the same commit without it,
# 3 interleaved rounds of 3 s, in events per second of server CPU (an A/A run
# of one commit against itself spread 0.95-1.06):
#
#   async_handlers=False (Shop)      acks 1.23x, fan-out 10 1.27x, 100 1.13x, orders 1.18x
#   emits right after the ack        fan-out 10 1.09x, 100 1.08x, orders 1.18x
#     (AcksFirst, instead of a background task per event)
#   no binary scan of outgoing       orders 1.10x, acks 1.05x
#     packets (JSONPacket)
#   apply_websocket_mask             orders 1.08x (every client frame is unmasked)
#   PacketJSON                       orders 1.06x, acks 1.04x
#
# Measured and dropped: reading room membership from python-socketio's room
# table instead of sio.rooms(sid) (0.98-1.04x, fan-out to 1000 included).
#
# Those that read or replace a private name of a pinned library are listed in
# LIBRARY_HOOKS and checked at start (check_libraries): with another version
# the server stops with a clear message instead of silently sending nothing.

PACKET_INT_MAX_DIGITS = 100


def packet_int(digits: str) -> int:
    """An integer read from a packet; a longer one is refused, as engineio does."""
    if len(digits) > PACKET_INT_MAX_DIGITS:
        raise ValueError(f"an integer of over {PACKET_INT_MAX_DIGITS} digits")
    return int(digits)


class PacketJSON:
    """The JSON python-socketio and python-engineio read and write packets
    with (their public `json=` option): the standard library's, compact,
    reading integers with packet_int, and with one encoder and one decoder
    made once (json.dumps and json.loads given options build new ones on
    every call)."""

    encoder = json.JSONEncoder(separators=(",", ":"))
    decoder = json.JSONDecoder(parse_int=packet_int)

    @classmethod
    def dumps(cls, value: Any, **_: Any) -> str:
        return cls.encoder.encode(value)

    @classmethod
    def loads(cls, text: str | bytes, **_: Any) -> Any:
        return cls.decoder.decode(text.decode() if isinstance(text, bytes) else text)


class AcksFirst(socketio.Server):
    """python-socketio sends an event's ack when the handler returns. What the
    handler left to send after it (Context.emit_after_ack, kept by
    Shop.send_after_ack) goes out right then, from the same greenlet: the
    client reads its own outcome first, and the ack and the broadcast leave in
    one wake-up of each socket's writer; a background task per event would
    cost a task switch."""

    def __init__(self, shop: "Shop", **options: Any) -> None:
        self.shop = shop
        super().__init__(**options)

    def _handle_event_internal(self, server: socketio.Server, sid: str, eio_sid: str,
                               data: list, namespace: str, id: int | None) -> None:
        try:
            super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)
        finally:
            run_all(self.shop.pending_emits.pop(eventlet.getcurrent(), ()))


class JSONPacket(socketio.packet.Packet):
    """Packets of plain JSON. Since no bytes ever come in (LenientPacket
    refuses binary attachments), none go out: outgoing packets skip
    python-socketio's recursive search of every payload for bytes, which
    costs more than encoding the payload."""

    uses_binary_events = False


def apply_websocket_mask(data: bytes, mask: bytes, length: int | None = None,
                         offset: int = 0) -> bytes:
    """eventlet unmasks every byte a client sends in a Python loop (~1 ms per
    5 KB, all of it blocking the hub); one big-integer XOR does the same."""
    length = len(data) if length is None else length
    start = offset % 4
    key = (bytes(mask) * (length // 4 + 2))[start:start + length]
    return (int.from_bytes(data[:length], "big") ^ int.from_bytes(key, "big")).to_bytes(
        length, "big")


# What this server reads, replaces or extends in the libraries, as of the
# versions pinned in requirements.txt (speed-ups here; fixes in "Packets and
# transports").
LIBRARY_HOOKS = ((socketio.Server, "_handle_event_internal"),
                 (socketio.Server, "_handle_eio_message"),
                 (socketio.Server, "_handle_eio_connect"),
                 (socketio.Server, "_engineio_server_class"),
                 (socketio.packet.Packet, "uses_binary_events"),
                 (eventlet.websocket.RFC6455WebSocket, "_apply_mask"))


def check_libraries(sio: socketio.Server) -> None:
    """Other library versions may lack what this server extends, and it would
    then fail in silence (acks without emits, frames unchecked): refuse to start."""
    missing = [f"{owner.__module__}.{owner.__qualname__}.{name}"
               for owner, name in LIBRARY_HOOKS if not hasattr(owner, name)]
    if getattr(sio.eio, "_async", {}).get("websocket") is not CheckedWebSocket:
        missing.append("engineio.Server._async['websocket']")
    if missing:
        raise ConfigError(f"the installed libraries lack {', '.join(missing)};"
                          " install the versions pinned in requirements.txt")


def apply_speedups(cfg: Config) -> None:
    """What is set process-wide on the libraries, once, when the server starts."""
    eventlet.websocket.RFC6455WebSocket._apply_mask = staticmethod(apply_websocket_mask)
    # A long-polling POST may batch many packets; python-engineio drops a batch
    # of more than 16 without a word (its documented knob). The body is bounded
    # by the payload limit, so the packet count needs no bound of its own.
    Payload.max_decode_packets = cfg.max_payload_bytes


# =============================================================================
# Packets and transports: what is not the protocol
# =============================================================================

EVENT_PACKETS = (socketio.packet.EVENT, socketio.packet.BINARY_EVENT)
PACKET_TYPES = frozenset("0123456")     # CONNECT ... BINARY_ACK


class NotAPacket(ValueError):
    """Input that is not Socket.IO at all; the connection is closed (Server)."""


class LenientPacket(JSONPacket):
    """An event packet that cannot be decoded (broken JSON, a number longer
    than Python parses, nesting deeper than its recursion limit, no event name)
    would be dropped with a traceback and the client left waiting. Decoded as
    the event MALFORMED instead, it gets an `Invalid payload` ack like any
    other bad input. So does an event named `connect` or `disconnect`, which
    python-socketio would otherwise pass to the connection handlers, an event
    with binary attachments (the protocol is JSON: so none go out either, see
    JSONPacket), and an event with a string no field may hold (see unsafe_text).

    What is not a Socket.IO packet at all (an unknown packet type, a binary
    frame that is no attachment, a handshake that is not JSON) raises
    NotAPacket, and the server closes that connection, as socket.io does."""

    def decode(self, encoded_packet: Any) -> int:
        if not isinstance(encoded_packet, str):
            raise NotAPacket("a binary frame that is not an attachment")
        if encoded_packet[:1] not in PACKET_TYPES or not encoded_packet:
            raise NotAPacket(f"unknown packet type {shown(encoded_packet[:1])!r}")
        try:
            attachments = super().decode(encoded_packet)
        except (ValueError, RecursionError) as error:
            if self.packet_type not in EVENT_PACKETS:
                raise NotAPacket(f"packet type {self.packet_type}: {error}") from None
            self.data = [MALFORMED, "the event's arguments are not valid JSON"]
            return 0
        if self.packet_type not in EVENT_PACKETS:
            return attachments
        if not (isinstance(self.data, list) and self.data and isinstance(self.data[0], str)):
            self.data = [MALFORMED, "an event is a JSON array that starts with its name"]
        elif self.data[0] in socketio.Server.reserved_events:
            self.data = [MALFORMED, f"{self.data[0]!r} is a reserved event name"]
        elif self.packet_type == socketio.packet.BINARY_EVENT:
            self.data = [MALFORMED, "binary attachments are not accepted; send JSON"]
        elif MAYBE_UNSAFE.search(encoded_packet):
            arguments = self.data[1] if len(self.data) == 2 else self.data[1:]
            why = unsafe_text(self.data[0], "the event name") or unsafe_text(arguments)
            if why:
                self.data = [MALFORMED, why]
        return attachments

    def add_attachment(self, attachment: Any) -> bool:
        if not isinstance(attachment, bytes):   # socket.io closes on this too
            raise NotAPacket("text where a binary attachment was announced")
        return super().add_attachment(attachment)


class Server(AcksFirst):
    """python-socketio's Server, with what the pinned 5.18.1 needs help with
    (methods checked at start by check_libraries):

    - Input that is not a Socket.IO packet closes that connection with one log
      line; python-socketio would log a traceback and leave it open.
    - A connection that opens Engine.IO but never sends the Socket.IO CONNECT
      packet is closed after CONNECT_TIMEOUT, as socket.io does; it would
      otherwise hold a slot forever, answering pings.
    - Its Engine.IO server reads websockets through CheckedFrames.
    - (From AcksFirst) what a handler left to send after its ack goes out
      right after python-socketio sends the ack."""

    def _engineio_server_class(self) -> Callable[..., engineio.Server]:
        return functools.partial(EngineServer, self.shop)

    def _handle_eio_message(self, eio_sid: str, data: str | bytes | None) -> None:
        if not data:            # "4" alone: python-socketio would take it for an event
            self.close_session(eio_sid, "an empty Engine.IO message")
            return
        try:
            super()._handle_eio_message(eio_sid, data)
        except ValueError as error:   # NotAPacket, or python-socketio's own refusals
            self.close_session(eio_sid, f"not a Socket.IO packet ({error})")

    def _handle_eio_connect(self, eio_sid: str, environ: dict) -> None:
        super()._handle_eio_connect(eio_sid, environ)
        # A bare timer of the hub, not a greenlet per connection: its callback
        # never waits (close_session starts a task for that).
        eventlet.hubs.get_hub().schedule_call_global(
            self.shop.config.connect_timeout_s, self.close_if_never_connected, eio_sid)

    def close_if_never_connected(self, eio_sid: str) -> None:
        if eio_sid in self.eio.sockets and self.manager.sid_from_eio_sid(eio_sid, "/") is None:
            self.close_session(eio_sid, "no Socket.IO CONNECT within"
                                        f" {self.shop.config.connect_timeout_s:g}s")

    def close_session(self, eio_sid: str, why: str) -> None:
        """End an Engine.IO session, with one log line. Not with
        eio.disconnect, which waits until the client has read the close packet:
        over long-polling it never does (its next poll is refused as closed),
        and the request that is closing the session would hang."""
        log.info("closing sid=%s user=%s: %s", *self.who(eio_sid), why)
        session = self.eio.sockets.get(eio_sid)
        if session is not None:
            session.close(wait=False, reason=self.eio.reason.SERVER_DISCONNECT)

    def who(self, eio_sid: str) -> tuple[str, str]:
        """(socket id, user) behind an Engine.IO session, for log lines."""
        sid = self.manager.sid_from_eio_sid(eio_sid, "/")
        return sid or eio_sid, user_of(self.shop.peers.get(sid or ""))


class EngineServer(engineio.Server):
    """python-engineio's Server with CheckedWebSocket as its websocket; the
    table of its async driver is copied, not changed, for this server alone."""

    def __init__(self, shop: Shop, **options: Any) -> None:
        super().__init__(**options)
        self.shop = shop
        self._async = {**self._async, "websocket": CheckedWebSocket}


ENGINEIO_CLIENT_PACKETS = frozenset("123456b")  # close ping pong message upgrade noop, b: base64
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009


def frame_problem(data: str | bytes | None, limit: int) -> tuple[int, str] | None:
    """Why a websocket message cannot be taken, as a close code and reason."""
    if data is None:
        return None
    if len(data) > limit:
        return CLOSE_TOO_BIG, f"message of {len(data)} bytes is above the limit of {limit}"
    if isinstance(data, str):
        if not data or data[0] not in ENGINEIO_CLIENT_PACKETS:
            return CLOSE_PROTOCOL_ERROR, "not an Engine.IO packet"
        if data[0] == "b":
            try:
                base64.b64decode(data[1:], validate=True)
            except ValueError:
                return CLOSE_PROTOCOL_ERROR, "not an Engine.IO packet: bad base64"
    return None


class CheckedFrames:
    """The websocket python-engineio reads from. A text frame that is not an
    Engine.IO packet ("hello", an empty frame) would raise inside
    python-engineio, which then writes an HTTP 500 response into the open
    websocket and leaves the session open until the ping timeout. Here it
    closes the websocket with a close code and reason, and one log line; so
    does a message above MAX_PAYLOAD_BYTES, and every close eventlet makes
    for its own reasons (a frame above the limit: 1009). Closing twice is a
    no-op, so no "socket shutdown error" follows."""

    def __init__(self, shop: Shop, ws: Any, eio_sid: str) -> None:
        self.shop, self.ws, self.eio_sid, self.closed = shop, ws, eio_sid, False
        self.close_websocket = ws.close
        ws.close = self.close          # eventlet's own closes come here too

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ws, name)

    def wait(self) -> str | bytes | None:
        data = self.ws.wait()
        problem = frame_problem(data, self.shop.config.max_payload_bytes)
        if problem is None:
            return data
        self.close(problem, received=data)
        return None                    # python-engineio ends the session

    def close(self, close_data: tuple[int, str] | None = None, received: Any = None) -> None:
        if self.closed:
            return
        self.closed = True
        if close_data is not None:
            seen = "" if received is None or close_data[0] == CLOSE_TOO_BIG else \
                f", received {shown(received)!r}"
            log.info("closing sid=%s user=%s: %s (websocket close %d%s)",
                     *self.shop.sio.who(self.eio_sid), close_data[1], close_data[0], seen)
            drain(self.ws.socket)
        self.close_websocket(close_data)


def drain(sock: Any, idle_s: float = 0.1, limit_s: float = 1.0) -> None:
    """Read and drop what the client is still sending (the rest of a frame
    too big to read). Closing a socket with unread data resets the connection,
    and the close frame would be lost on its way: a browser would report 1006."""
    deadline = time.monotonic() + limit_s
    try:
        sock.settimeout(idle_s)
        while time.monotonic() < deadline and sock.recv(65536):
            pass
    except OSError:        # the idle timeout, or the client already left
        pass


class CheckedWebSocket(engineio_eventlet.WebSocketWSGI):
    """python-engineio's eventlet websocket, reading through CheckedFrames."""

    def __init__(self, handler: Callable, server: "EngineServer") -> None:
        eio_sid = getattr(getattr(handler, "__self__", None), "sid", "-")
        super().__init__(lambda ws: handler(CheckedFrames(server.shop, ws, eio_sid)), server)


class WebsocketLog:
    """wsgi.errors for eventlet's websocket code, which writes lines without a
    newline to stderr (glued to the next log line): they become debug lines."""

    def write(self, text: str) -> None:
        if text.strip():
            log.debug("websocket: %s", text.strip())

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


def transports(shop: Shop, wsgi_app: Callable) -> Callable:
    """What every Socket.IO request goes through first:

    - permessage-deflate is refused: eventlet would compress every frame with
      zlib state per connection, for JSON messages too small to gain from it
      (the benchmark measured fan-out down a third and 2.5x the memory per
      connection). Clients that offer it simply go on uncompressed;
    - eventlet's websocket writes to a log (WebsocketLog), not to stderr;
    - a long-polling POST above MAX_PAYLOAD_BYTES, which python-engineio
      refuses and ends the session for, is logged with its size;
    - a long-polling POST whose body is not Engine.IO packets (the checks of
      CheckedFrames) ends its session with one log line and a 400; in
      python-engineio it would raise, with a traceback, and leave it open."""
    errors = WebsocketLog()
    limit = shop.config.max_payload_bytes

    def app(environ: dict, start_response: Callable) -> Any:
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        environ["wsgi.errors"] = errors
        size = environ.get("CONTENT_LENGTH") or "0"
        if environ.get("REQUEST_METHOD") != "POST" or not size.isdigit() or size == "0":
            return wsgi_app(environ, start_response)
        eio_sid = (parse_qs(environ.get("QUERY_STRING", "")).get("sid") or ["-"])[0]
        if int(size) > limit:
            log.info("closing sid=%s user=%s: a long-polling POST of %s bytes is above the"
                     " limit of %d", *shop.sio.who(eio_sid), size, limit)
            return wsgi_app(environ, start_response)
        body = environ["wsgi.input"].read(int(size))
        environ["wsgi.input"] = io.BytesIO(body)
        problem = payload_problem(body, limit)
        if problem is None or eio_sid not in shop.sio.eio.sockets:
            return wsgi_app(environ, start_response)
        shop.sio.close_session(eio_sid, f"{problem} in a long-polling POST")
        return respond(start_response, "400 Bad Request", json.dumps({"error": problem}))
    return app


def payload_problem(body: bytes, limit: int) -> str | None:
    """Why a long-polling body (packets split by the record separator) is not Engine.IO."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    for packet in text.split("\x1e"):
        problem = frame_problem(packet, limit)
        if problem is not None:
            return problem[1]
    return None


# =============================================================================
# HTTP routes
# =============================================================================

def respond(start_response: Callable, status: str, body: str | bytes,
            content_type: str = "application/json", *headers: tuple[str, str]) -> list[bytes]:
    data = body.encode() if isinstance(body, str) else body
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(data))),
                            ("Cache-Control", "no-store"), *headers])
    return [data]


def not_found(start_response: Callable) -> list[bytes]:
    return json_response(start_response, {"error": "Not found"}, "404 Not Found")


def static_file(start_response: Callable, path: Path) -> list[bytes]:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return respond(start_response, "200 OK", path.read_bytes(), content_type)


def json_response(start_response: Callable, value: Any, status: str = "200 OK") -> list[bytes]:
    return respond(start_response, status, json.dumps(value))


def tester_page(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    return respond(start_response, "200 OK", TESTER_FILE.read_bytes(), "text/html; charset=utf-8")


def asyncapi(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    return respond(start_response, "200 OK", ASYNCAPI_FILE.read_bytes())


def health(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    return json_response(start_response, {"ok": True})


def products(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    return json_response(start_response, shop.store.products())


def prometheus(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    return respond(start_response, "200 OK", shop.metrics.render(shop), "text/plain; version=0.0.4")


def server_info(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    """What the tester page may offer: dev tokens, the local client script, the Admin UI."""
    return json_response(start_response, {
        "devTokens": not shop.config.jwt_secret,
        "clientScript": CLIENT_SCRIPT_URL if CLIENT_SCRIPT.exists() else None,
        "adminUi": ADMIN_UI_URL if shop.config.admin_ui and ADMIN_UI_DIR.exists() else None,
    })


def client_script(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    if not CLIENT_SCRIPT.exists():
        return not_found(start_response)
    return static_file(start_response, CLIENT_SCRIPT)


def admin_ui(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    """The Socket.IO Admin UI front-end, behind the ADMIN_UI credentials (HTTP
    Basic); the UI then logs in to the /admin namespace with the same ones."""
    if not shop.config.admin_ui or not ADMIN_UI_DIR.exists():
        return not_found(start_response)
    if not admin_credentials_match(shop, environ.get("HTTP_AUTHORIZATION", "")):
        return respond(start_response, "401 Unauthorized", '{"error": "Unauthorized"}',
                       "application/json", ("WWW-Authenticate", 'Basic realm="Admin UI"'))
    name = environ["PATH_INFO"].removeprefix(ADMIN_UI_URL) or "index.html"
    path = (ADMIN_UI_DIR / name).resolve()
    if not path.is_relative_to(ADMIN_UI_DIR.resolve()) or not path.is_file():
        return not_found(start_response)
    return static_file(start_response, path)


def admin_credentials_match(shop: Shop, header: str) -> bool:
    scheme, _, encoded = header.partition(" ")
    try:
        given = base64.b64decode(encoded, validate=True).decode()
    except ValueError:
        return False
    expected = ":".join(shop.config.admin_ui or ("", ""))
    return scheme.lower() == "basic" and secrets.compare_digest(given.encode(), expected.encode())


def dev_token(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    """Tokens for the tester page: only while the server runs on its dev
    secret, and only for this server's own pages (see dev_token_refusal)."""
    if shop.config.jwt_secret:
        return not_found(start_response)
    refusal = dev_token_refusal(shop, environ)
    if refusal:
        log.info("refused GET /dev/token: %s", refusal)
        return json_response(start_response, {"error": refusal}, "403 Forbidden")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    user_id = (query.get("user") or [""])[0].strip()
    role = (query.get("role") or ["user"])[0]
    name = (query.get("name") or [user_id])[0].strip() or user_id
    if not 1 <= len(user_id) <= USER_ID_MAX or role not in ("user", "admin") \
            or len(name) > USER_ID_MAX or UNSAFE_CHARACTER.search(user_id + name):
        return json_response(start_response, {"error": "user (1-128 characters) is required,"
                                              " role must be user or admin, and name at most"
                                              " 128 characters"}, "400 Bad Request")
    return json_response(start_response, {"token": issue_token(shop.secret, user_id, role,
                                                               name=name)})


def dev_token_refusal(shop: Shop, environ: dict) -> str | None:
    """Why a request may not have a dev token, or None. A script on any other
    site could otherwise read one and act as an admin: so a request from a
    page of another origin is refused (and the route sends no CORS header),
    and so is a Host that is neither an IP address, localhost, nor in
    ALLOWED_HOSTS, which is what a DNS-rebinding page sends."""
    host = environ.get("HTTP_HOST", "")
    if not host_allowed(host, shop.config.allowed_hosts):
        return (f"Host {shown(host)!r} is not a name of this server (a DNS-rebinding page looks"
                " like this); add it to ALLOWED_HOSTS to allow it")
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None and origin not in (f"http://{host}", f"https://{host}") \
            or environ.get("HTTP_SEC_FETCH_SITE", "same-origin") not in ("same-origin", "none"):
        where = shown(origin or "another site")
        return (f"dev tokens are for this server's own pages, not for {where};"
                " open the tester it serves, or use python server.py token USER")
    return None


def host_allowed(host: str, allowed_hosts: tuple[str, ...]) -> bool:
    """A page can only be rebound to this server through a name: IP addresses
    and localhost are safe, other names must be listed in ALLOWED_HOSTS."""
    name = host_name(host)
    if name == "localhost" or name in allowed_hosts or "*" in allowed_hosts:
        return True
    return is_ip_address(name)


def host_name(host: str) -> str:
    """'shop.lan:8000' -> 'shop.lan', '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1:].partition("]")[0].lower()
    return (host.partition(":")[0] if host.count(":") == 1 else host).lower()


def is_loopback(host: str) -> bool:
    """Whether a bind address keeps the server to this machine."""
    return host.lower() == "localhost" or is_ip_address(host) and ipaddress.ip_address(
        host).is_loopback


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


ROUTES = {"/": tester_page, "/health": health, "/api/products": products,
          "/asyncapi.json": asyncapi,
          "/api/info": server_info, "/metrics": prometheus, "/dev/token": dev_token,
          CLIENT_SCRIPT_URL: client_script}


# Routes that no page of another origin may read: no CORS header, whatever CORS_ORIGINS says.
SAME_ORIGIN_ROUTES = {"/dev/token"}


def http_app(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    def start_with_cors(status: str, headers: list) -> Any:
        """The same CORS_ORIGINS as the Socket.IO endpoint."""
        origin = environ.get("HTTP_ORIGIN")
        if path in SAME_ORIGIN_ROUTES:
            pass
        elif shop.config.cors_origins == "*":
            headers.append(("Access-Control-Allow-Origin", "*"))
        elif origin in shop.config.cors_origins:
            headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return start_response(status, headers)

    path = environ.get("PATH_INFO", "/")
    route = admin_ui if path.startswith(ADMIN_UI_URL) else ROUTES.get(path)
    if route is None:
        return not_found(start_with_cors)
    if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
        return json_response(start_with_cors, {"error": "Method not allowed"},
                             "405 Method Not Allowed")
    return route(shop, environ, start_with_cors)


# =============================================================================
# Command line
# =============================================================================

def listen(cfg: Config) -> socket.socket:
    """The listening socket, never shared: eventlet would set SO_REUSEPORT, and
    a second server on the same port would then start without a word and get
    half of the new connections (members of one room on two servers)."""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    try:
        listener = eventlet.listen((cfg.host, cfg.port), family=family, backlog=LISTEN_BACKLOG,
                                   reuse_port=False)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {cfg.port} is already in use on {cfg.host} (another"
                              " server.py?): stop it, or choose another with --port") from None
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {error.strerror}") from None
    # Accepted sockets inherit TCP_NODELAY on Linux: small acks leave at once
    # instead of waiting ~40 ms for Nagle's algorithm.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def print_banner(cfg: Config, secret: str, port: int) -> None:
    """Where to point a browser, and how to get in."""
    if cfg.host in ("0.0.0.0", "::", ""):
        local = url_of("127.0.0.1" if cfg.host != "::" else "::1", port)
        print(f"Shop Realtime listening on all addresses, port {port}  (tester page: {local}/)")
        others = [url_of(a, port) + "/" for a in machine_addresses()]
        if others:
            print(f"  from other machines: {'  '.join(others)}")
    else:
        url = url_of(cfg.host, port)
        print(f"Shop Realtime listening on {url}  (tester page: {url}/)")
    print(f"Database: {cfg.database}")
    if cfg.jwt_secret:
        print("Tokens: python server.py token USER (with the same JWT_SECRET) signs one")
    else:
        ttl = DEFAULT_TOKEN_TTL
        print(f"Dev secret: {secret_file(cfg.database)} (set JWT_SECRET in production)")
        print(f"  demo user : {issue_token(secret, 'demo-user', 'user', name='Demo User')}")
        print(f"  demo admin: {issue_token(secret, 'demo-admin', 'admin', name='Demo Admin')}")
        print(f"  (valid {ttl}; more with python server.py token USER, or the tester's buttons)")
        if not is_loopback(cfg.host):
            print(f"WARNING: listening on {cfg.host}, beyond this machine, on the dev secret:"
                  f" anyone who can reach port {port} can mint user and admin tokens"
                  " (GET /dev/token). Set JWT_SECRET to turn dev tokens off.")
    print("Ctrl-C to stop.", flush=True)


def machine_addresses() -> list[str]:
    """This machine's own non-loopback IPv4 addresses, as its host name resolves."""
    try:
        found = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        return []
    return sorted({a[4][0] for a in found if not ipaddress.ip_address(a[4][0]).is_loopback})


def serve(cfg: Config) -> int:
    """Build the shop, listen, and run until SIGINT or SIGTERM; then stop
    accepting, deliver queued notifications and close the database."""
    secret = load_secret(cfg)
    shop = Shop(cfg, secret)
    check_libraries(shop.sio)
    apply_speedups(cfg)
    listener = listen(cfg)
    print_banner(cfg, secret, listener.getsockname()[1])

    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    shop.start()
    eventlet.spawn(eventlet.wsgi.server, listener, shop.app, log=logging.getLogger("shop.http"),
                   log_output=cfg.verbose, debug=False, max_size=MAX_CONNECTIONS)
    while not stopping:
        eventlet.sleep(SHUTDOWN_POLL_S)

    log.info("shutting down: no new connections, delivering queued notifications")
    listener.close()
    shop.stop()
    log.info("stopped")
    return 0


def reset(cfg: Config) -> int:
    store = Storage(cfg.database, exclusive=True)
    removed = store.reset()
    store.close()
    print(f"Reset {cfg.database}: removed {removed['orders']} orders, {removed['notifications']}"
          f" notifications and {removed['users']} users; the demo catalogue is back at its"
          " seeded stock and prices.")
    return 0


ENVIRONMENT_HELP = """environment variables (flags win over them):
  HOST, PORT, DATABASE  as --host, --port, --db
  JWT_SECRET            HS256 secret of your tokens; unset: a dev secret in <db>.secret,
                        demo tokens in the banner and at GET /dev/token
  ALLOWED_HOSTS         host names that may ask for dev tokens besides IPs and localhost
  REQUIRE_AUTH=1        as --require-auth
  CORS_ORIGINS          allowed origins, comma list (default *)
  RATE_LIMITS           e.g. message=20/10s,order:create=5/10s, or off
  MAX_PAYLOAD_BYTES     largest Engine.IO packet (default 100000)
  CONNECT_TIMEOUT       Engine.IO open without a Socket.IO CONNECT (default 45s)
  NOTIFY_QUEUE=0        deliver notifications inline
  ADMIN_UI=user:pass    the Socket.IO Admin UI at /admin-ui/ (after npm ci)
  REDIS_URL             several processes through Redis (pip install -r requirements-redis.txt)
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="server.py", description=__doc__.split("\n\n")[0],
                                     epilog=ENVIRONMENT_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help=f"bind address (HOST, default {DEFAULT_HOST})")
    parser.add_argument("--port", help=f"port, 0 for any free one (PORT, default {DEFAULT_PORT})")
    parser.add_argument("--db", help=f"SQLite file (DATABASE, default {DEFAULT_DATABASE})")
    parser.add_argument("--require-auth", action="store_true",
                        help="refuse connections without a valid token (REQUIRE_AUTH=1)")
    parser.add_argument("--verbose", action="store_true", help="log every event and request")
    commands = parser.add_subparsers(dest="command")
    signing = commands.add_parser("token", help="print a Bearer token signed with the server's"
                                  " secret")
    signing.add_argument("user_id")
    signing.add_argument("--role", choices=("user", "admin"), default="user")
    signing.add_argument("--email")
    signing.add_argument("--name")
    signing.add_argument("--ttl", default=DEFAULT_TOKEN_TTL, help="lifetime, e.g. 30m, 24h, 7d")
    signing.add_argument("--db", dest="command_db", help="SQLite file whose dev secret signs it")
    again = commands.add_parser("reset", help="a fresh workshop: no orders, notifications or"
                                " users, the demo catalogue at its seeded stock and prices")
    again.add_argument("--db", dest="command_db", help="SQLite file to reset")
    args = parser.parse_args(argv)
    if getattr(args, "command_db", None):
        args.db = args.command_db
    return args


def token(cfg: Config, args: argparse.Namespace) -> int:
    """Print a token signed with the server's secret, and say which secret."""
    print(issue_token(load_secret(cfg, create=False), args.user_id, args.role, args.email,
                      args.name, parse_duration(args.ttl)))
    source = "JWT_SECRET" if cfg.jwt_secret else (
        f"the dev secret {secret_file(cfg.database).resolve()}, which a server"
        f" started with --db {cfg.database} uses")
    print(f"signed with {source}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args, os.environ)
        if args.command == "reset":
            return reset(cfg)
        if args.command == "token":
            return token(cfg, args)
        return serve(cfg)
    except ConfigError as error:
        print(f"server.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
