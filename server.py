"""Shop Realtime: a Socket.IO server for an e-commerce real-time protocol.

Rooms and chat, presence, personal notifications, orders with status changes
and stock updates, over python-socketio hosted by eventlet, stored in SQLite;
every durable event is logged with an offset, so a client that reconnects
misses nothing. The protocol is the one README.md describes. This file reads
top to bottom:

    the protocol's constants -> the shop: its Socket.IO server, built from the
    settings -> the rules every event shares -> the events, in protocol order
    -> delivery: the event log, in order, and catch-up -> presence, rate limits
    and metrics -> storage -> auth -> validation and the order rules -> HTTP
    routes -> settings -> command line

It uses the libraries' public API only; what adapts them through their
insides (frames, packets, transports, speed-ups) is adapters.py. Several
processes through Redis live in cluster.py, imported only with REDIS_URL. Run
it with ``python server.py``; ``--help`` lists the options.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # As a program, eventlet patches the standard library before anything else
    # imports it. Imported as a module (the unit tests), server.py patches nothing.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # eventlet's notice of maintenance mode
        import eventlet
    eventlet.monkey_patch()

import argparse
import base64
import bisect
import errno
import fcntl
import functools
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
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qs

import adapters  # first: it imports eventlet without its notice of maintenance mode

# isort: split
import eventlet
import eventlet.semaphore
import eventlet.tpool
import eventlet.wsgi
import jwt
import socketio

# =============================================================================
# The protocol's constants
# =============================================================================

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
PAGE_DEFAULT, PAGE_MAX = 50, 100   # GET /api/orders and /api/notifications

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
# Written to the event log with the change they report, and replayed (see Delivery).
DURABLE_EVENTS = ("order:created", "order:updated", "product:stockUpdated",
                  "notification:received", "message")

# Token buckets: event -> (events, window in seconds). "*" is every other event.
DEFAULT_RATE_LIMITS: dict[str, tuple[int, float]] = {
    "message": (20, 10.0),
    "typing": (20, 10.0),
    "notification:send": (10, 10.0),
    "order:create": (5, 10.0),
    "*": (50, 10.0),
}

log = logging.getLogger("shop")


# =============================================================================
# The shop: one running server, built once from the settings
# =============================================================================

class Shop:
    """Everything a running server holds, made here and nowhere else: the
    Socket.IO server with its handlers, the storage, delivery in log order,
    presence, rate limits, metrics and the WSGI app. Building it opens the
    database; `start` starts the background tasks."""

    def __init__(self, cfg: Config, secret: str) -> None:
        self.config, self.secret = cfg, secret
        self.connections: dict[str, Connection] = {}   # this process's sockets
        self.tabs: Counter[str] = Counter()            # user id -> its sockets here
        self.store = Storage(cfg.database)
        if cfg.redis_url:
            cluster = load_cluster(cfg.redis_url, self.connections)
            self.presence: Presence = cluster
            self.limiter = RateLimiter(cfg.rate_limits, shared=cluster.take_token)
            manager = socketio.RedisManager(cfg.redis_url)
        else:
            self.presence, manager = LocalPresence(self.connections), None
            self.limiter = RateLimiter(cfg.rate_limits)
        self.metrics = Metrics()
        self.delivery = Delivery(self)
        self.store.on_commit = self.delivery.committed
        self.sio = adapters.StrictServer(
            async_mode="eventlet", client_manager=manager, cors_allowed_origins=cfg.cors_origins,
            max_payload_bytes=cfg.max_payload_bytes, connect_timeout_s=cfg.connect_timeout_s,
            argument_problem=argument_problem, around_message=self.delivery,
            logger=False, engineio_logger=False,
            who=lambda sid: user_of(self.connections.get(sid)),
            namespaces="*",          # every other namespace reaches refuse_other_namespace
            # Each socket's events run one after the other in its connection's
            # greenlet, in the order sent (as socket.io does), not in a new
            # greenlet each: acks 1.23x, fan-out 1.13-1.27x, orders 1.18x.
            async_handlers=False)
        self.sio.on("connect", functools.partial(connect, self))
        self.sio.on("disconnect", functools.partial(disconnect, self))
        self.sio.on("connect", refuse_other_namespace, namespace="*")
        for name, (handler, user_required) in EVENTS.items():
            self.sio.on(name, functools.partial(handle, self, name, handler, user_required))
        self.sio.on("*", functools.partial(unknown_event, self))
        if cfg.admin_ui:
            self.sio.instrument(auth={"username": cfg.admin_ui[0], "password": cfg.admin_ui[1]})
        self.app = adapters.transport_middleware(
            self.sio, socketio.WSGIApp(self.sio, functools.partial(http_app, self)))

    def start(self) -> None:
        self.delivery.start()
        self.store.start_checkpoints()
        self.presence.start(self.sio.start_background_task, self.broadcast_presence)

    def stop(self) -> None:
        """Leave the cluster, send what is queued, let the last emits go out,
        and close the database (which checkpoints and removes the WAL)."""
        self.presence.stop()
        self.delivery.stop()
        eventlet.sleep(SHUTDOWN_FLUSH_S)
        self.store.close()

    def broadcast_presence(self, user_ids: list[str], status: str) -> None:
        for user_id in user_ids:
            self.delivery.send("presence:update", presence_update(user_id, status))


# =============================================================================
# The rules every event shares
# =============================================================================
#
# Each client event has one small handler, registered with @event; `handle`
# applies what every event shares: the rate limit, one payload argument, the
# user requirement, refusals as error acks, and `Internal error` (with the
# traceback logged) for anything unexpected. What a handler sends goes out
# through `shop.delivery`, after the handler has returned and its ack is
# out: a client always learns the outcome of its own request first.

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


@dataclass
class Connection:
    """One connected socket and who is behind it."""
    sid: str
    user: User | None
    why_anonymous: str = ""
    first_tab: bool | None = None     # set once presence has counted it
    listening: bool = False           # counted in shop.tabs: it gets what its user is sent

    @property
    def rate_key(self) -> str:
        return f"user:{self.user.id}" if self.user else self.sid

    def public(self) -> dict | None:
        return {"id": self.user.id, "name": self.user.name} if self.user else None


class Context:
    """What a handler knows of its call, and what it may do."""

    def __init__(self, shop: Shop, connection: Connection) -> None:
        self.shop, self.connection, self.sid = shop, connection, connection.sid
        self.user, self.store, self.config = connection.user, shop.store, shop.config

    def emit(self, event_name: str, data: dict, **target: Any) -> None:
        """Send an event that is not logged (joined, left, typing), after the ack."""
        self.shop.delivery.send(event_name, data, **target)

    def in_room(self, room: str) -> bool:
        return room in self.shop.sio.rooms(self.sid)

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


def handle(shop: Shop, name: str, handler: Handler, user_required: bool, sid: str,
           *args: Any) -> Ack | None:
    """The rules every event shares (see the top of this section)."""
    connection = shop.connections.get(sid)
    if connection is None:          # the socket left while this was in flight
        return None
    started = time.perf_counter()
    try:
        shop.limiter.check(connection.rate_key, name)
        if len(args) > 1:
            raise invalid("send one payload argument")
        if user_required and connection.user is None:
            raise Refusal("Unauthorized", reason=connection.why_anonymous)
        ack = handler(Context(shop, connection), args[0] if args else None)
    except Refusal as refusal:
        ack = refusal.ack
        level = logging.DEBUG if ack["error"] == "Rate limit exceeded" else logging.INFO
        log.log(level, "%s sid=%s user=%s -> %s", name, sid, user_of(connection), ack)
    except Exception:
        log.exception("%s sid=%s user=%s failed", name, sid, user_of(connection))
        ack = {"error": "Internal error"}
    else:
        log.debug("%s sid=%s user=%s -> ok", name, sid, user_of(connection))
    shop.metrics.observe(name, time.perf_counter() - started, "error" in ack)
    return ack


# =============================================================================
# The events, in protocol order
# =============================================================================

# -- connecting, identity and presence --------------------------------------------

def connect(shop: Shop, sid: str, environ: dict, auth: Any) -> bool:
    user, why = authenticate(handshake_token(environ, auth), shop.secret)
    if user is None and shop.config.require_auth:
        log.info("refused sid=%s reason=%s", sid, why)
        raise socketio.exceptions.ConnectionRefusedError("Unauthorized", {"reason": why})
    connection = shop.connections[sid] = Connection(sid, user, why)
    shop.delivery.hold(sid)            # no logged event reaches it before its catch-up
    try:
        if user:
            shop.store.upsert_user(user)
        connection.first_tab = shop.presence.join(sid, user.id if user else None)  # Redis waits
        # The socket enters its rooms, and what it missed is queued (a catch-up
        # from auth.serverOffset, else saved notifications). The client hears
        # of its connection when this returns; then they follow.
        shop.delivery.welcome(connection,
                              auth.get("serverOffset") if isinstance(auth, dict) else None)
        if shop.sio.get_environ(sid) is None:
            raise ConnectionAbortedError("the client left while it was connecting")
    except Exception as error:
        # python-socketio calls no disconnect handler for a socket that never
        # finished connecting: this one forgets it here.
        level = logging.INFO if isinstance(error, ConnectionAbortedError) else logging.ERROR
        log.log(level, "connect sid=%s user=%s failed: %s", sid, user_of(connection), error,
                exc_info=level == logging.ERROR)
        disconnect(shop, sid, "connect failed")
        return False
    if user:
        shop.tabs[user.id] += 1
        connection.listening = True
    log.info("connect sid=%s user=%s role=%s transport=%s", sid, user_of(connection),
             user.role if user else "anonymous", shop.sio.transport(sid))
    if connection.first_tab:
        shop.delivery.send("presence:update", presence_update(user.id, "online"))
    return True


def refuse_other_namespace(namespace: str, sid: str, environ: dict, auth: Any = None) -> None:
    """The protocol lives in the default namespace alone."""
    raise socketio.exceptions.ConnectionRefusedError("Invalid namespace")


def disconnect(shop: Shop, sid: str, reason: Any = None) -> None:
    connection = shop.connections.pop(sid, None)
    if connection is None:
        return
    log.info("disconnect sid=%s user=%s reason=%s", sid, user_of(connection), reason)
    shop.delivery.release(sid)
    user = connection.user
    if connection.listening:
        shop.tabs[user.id] -= 1
        if shop.tabs[user.id] <= 0:
            del shop.tabs[user.id]
    if user is None or user.id not in shop.tabs:
        shop.limiter.forget(connection.rate_key)    # its last socket here
    if connection.first_tab is not None and shop.presence.leave(sid, user.id if user else None):
        shop.delivery.send("presence:update", presence_update(user.id, "offline"))


def user_of(connection: Connection | None) -> str:
    return connection.user.id if connection and connection.user else "-"


# -- rooms and chat --------------------------------------------------------------

@event("joinRoom")
def join_room(ctx: Context, data: Any) -> Ack:
    room = room_name(data)
    since = data.get("since") if isinstance(data, dict) else None
    if since is not None and not isinstance(since, str):
        raise invalid("since must be an offset (a string)")
    if ctx.is_reserved_room(room):
        raise Refusal("Access denied")
    joined, history = ctx.shop.delivery.enter_room(ctx.sid, room, since)
    if joined:
        ctx.emit("joined", {"event": "joined", "room": room, "by": ctx.sid,
                            "user": ctx.connection.public()}, to=room, skip_sid=ctx.sid)
    return ok(room=room, **history)


@event("leaveRoom")
def leave_room(ctx: Context, data: Any) -> Ack:
    room = room_name(data)
    if ctx.is_reserved_room(room):
        raise Refusal("Access denied")
    if ctx.shop.delivery.leave_room(ctx.sid, room):
        ctx.emit("left", {"event": "left", "room": room, "by": ctx.sid,
                          "user": ctx.connection.public()}, to=room)
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
    meta = optional(data, "meta", dict, META_MAX_BYTES)
    if not ctx.in_room(room):
        raise Refusal("Not in room")
    payload = {"room": room, "text": text, "from": ctx.connection.public(), "ts": now_iso()}
    if meta is not None:
        payload["meta"] = meta
    ctx.store.log_event("message", payload, room=room)      # a transaction of its own
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
    if not ctx.config.notify_queue:
        ctx.shop.delivery.flush()         # sent by this handler, before its ack
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
        ctx.store.log_event("order:created", {"event": "order:created", "order": order},
                            user_id=order["user"])
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
            moved = quantities(ctx.store.order_items(order_id))
            if sign < 0:
                check_stock(moved, ctx.store.catalogue(moved))
            stock_changes = ctx.store.add_stock(moved, sign)
        ctx.store.set_status(order_id, status)
        order = ctx.store.order(order_id)
        ctx.store.log_event("order:updated", {"event": "order:updated", "order": order},
                            user_id=owner)
        for change in stock_changes:
            ctx.store.log_event("product:stockUpdated", {
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
        ctx.emit("typing", {"event": "typing", "from": ctx.user.id, "at": now_iso()},
                 to=f"user:{to_user_id}")
        return ok(mode="personal")
    room = room_name(data)
    if not ctx.in_room(room):
        raise Refusal("Not in room")
    ctx.emit("typing", {"event": "typing", "from": ctx.user.id, "room": room, "at": now_iso()},
             to=room, skip_sid=ctx.sid)
    return ok(mode="room")


# -- everything else -------------------------------------------------------------

@event(adapters.MALFORMED)
def malformed(ctx: Context, why: Any) -> Ack:
    """A packet that could not be decoded (adapters.LenientPacket says why)."""
    raise invalid(why)


def unknown_event(shop: Shop, name: str, sid: str, *args: Any) -> Ack | None:
    """Without this catch-all python-socketio drops unknown events silently,
    and a client waiting for the ack would only ever see a timeout. They share
    the `*` rate limit and metrics label."""
    def refuse(ctx: Context, data: Any) -> Ack:
        raise Refusal(f"Unknown event: {name}")
    return handle(shop, "*", refuse, False, sid, *args[:1])


# =============================================================================
# Delivery: the event log, in order, and catch-up
# =============================================================================
#
# Every durable event is written to the log in the transaction of the change
# it reports (Storage.log_event), so a crash between commit and emit loses
# nothing. Everything the server sends leaves through one queue, in order:
# logged events in log order with their offsets, the events that are not
# logged, and what a socket missed. Handlers only queue, and the queue is sent
# right after the ack (message_handled) or by the worker greenlet (what comes
# from elsewhere): a client reads its own ack first. A catching-up socket has
# the queue sent first, then enters its rooms at that position with what it
# missed queued, nothing waiting in between: no event reaches it twice or too
# early.
# With REDIS_URL each process follows the shared log and sends to its own
# sockets only (ignore_queue), so every socket gets log order too.

OFFSET = re.compile(r"([0-9a-f]{8})-([0-9]{16})")


class LogEntry(NamedTuple):
    """One event of the log: where it goes follows from its name and fields.
    (A tuple: made for every durable event, at a third of a dataclass's cost.)"""
    seq: int
    name: str
    payload: dict
    text: str                       # the payload as the log holds it (JSON)
    user_id: str | None = None      # owner (orders) or recipient (notifications)
    room: str | None = None         # message


class Delivery:
    """The one queue every server event leaves through (see above). Also the
    in-process queue that notifications go through: saved first, sent here."""

    def __init__(self, shop: Shop) -> None:
        self.shop, self.store = shop, shop.store          # shop.sio is made after it
        self.shared = bool(shop.config.redis_url)  # other processes write to the log too
        self.log_id = self.store.log_id()
        self.position = self.store.last_seq()     # a new process starts at the end
        self.items: deque = deque()
        self.doorbell = eventlet.semaphore.Semaphore(0)
        self.ringing = False
        self.handling = 0          # Socket.IO packets being handled (message_started)
        # Only an emit through Redis can wait: one flush at a time, then.
        self.sending = eventlet.semaphore.Semaphore() if self.shared else nullcontext()
        self.held: dict[str, float] = {}          # sid -> logged events up to here skip it
        self.worker: Any = None
        self.pruner: Any = None
        self.stopping = False

    # -- offsets ---------------------------------------------------------------

    def offset(self, seq: int) -> str:
        """The log's id and the position, fixed-width: offsets of one log
        compare as strings, and one of another log is never taken for ours."""
        return f"{self.log_id}-{seq:016d}"

    def with_offset(self, entry: LogEntry) -> dict:
        """A logged event as it is sent: its payload and its offset. It carries
        its JSON too, the log's text with the offset added (adapters.Encoded):
        encoding it again for the wire cost ~4 % of an order's instructions."""
        offset = self.offset(entry.seq)
        sent = adapters.Encoded(entry.payload, f'{entry.text[:-1]},"offset":"{offset}"}}')
        sent["offset"] = offset
        return sent

    def seq_of(self, offset: Any) -> int | None:
        """The position an offset of this log names, or None."""
        match = OFFSET.fullmatch(offset) if isinstance(offset, str) else None
        return int(match[2]) if match and match[1] == self.log_id else None

    # -- what goes in the queue ------------------------------------------------

    def committed(self, entries: list[LogEntry]) -> None:
        """Storage calls this right after a COMMIT: log order is queue order."""
        self.items.extend(entries)
        self.ring()

    def send(self, event_name: str, data: dict, **target: Any) -> None:
        """An event that is not logged."""
        self.items.append(functools.partial(self.shop.sio.emit, event_name, data, **target))
        self.ring()

    def send_missed(self, sid: str, events: list[tuple[str, dict]]) -> None:
        """What one socket missed, queued right after a flush: the queue is
        empty, so these go before any event committed later."""
        self.items.append(functools.partial(self.emit_to, sid, events))
        self.ring()

    def ring(self) -> None:
        """Wake the worker; not while a packet is handled, whose end sends all."""
        if not self.ringing and not self.handling:
            self.ringing = True
            self.doorbell.release()

    def message_started(self) -> None:
        """A client's packet is about to be handled in its connection's
        greenlet (adapters.StrictServer tells). What is queued from elsewhere
        goes out first: an event acts on the rooms as they were when it came.
        (flush never raises: a failed send is logged, the rest go on.)"""
        if self.items:
            self.flush(follow_log=False)
        self.handling += 1

    def message_handled(self) -> None:
        """Its handler's ack is queued on the socket: what the handler queued
        goes now, from the same greenlet, right behind the ack."""
        self.handling -= 1
        self.flush(follow_log=False)

    # -- the worker --------------------------------------------------------------

    def start(self) -> None:
        self.worker = eventlet.spawn(self.run)
        self.pruner = eventlet.spawn(self.prune_forever)

    def run(self) -> None:
        while not self.stopping:         # flush never raises: the worker never dies
            # With other processes writing, look at the log now and then too.
            self.doorbell.acquire(timeout=FOLLOW_INTERVAL_S if self.shared else None)
            self.ringing = False
            self.flush()

    def flush(self, follow_log: bool = True) -> None:
        """Send everything queued, in order; then, with other processes, what
        they logged. Nothing here waits, but an emit through Redis."""
        if not (self.items or follow_log and self.shared):
            return
        with self.sending:
            while self.items:
                item = self.items.popleft()
                try:
                    if isinstance(item, LogEntry):
                        self.send_logged(item)
                    else:
                        item()
                except Exception:   # one send that failed (or SQLite): the rest go on
                    log.exception("sending failed")
            if follow_log and self.shared:
                try:
                    self.follow(self.store.last_seq())
                except sqlite3.Error:
                    log.exception("reading the event log failed; trying again shortly")

    def send_logged(self, entry: LogEntry) -> None:
        if entry.seq <= self.position:
            return                       # already read from the log (follow)
        if entry.seq > self.position + 1 and self.shared:
            self.follow(entry.seq - 1)   # other processes' events come first
        self.emit_logged(entry)

    def follow(self, through: int) -> None:
        """Send what the log holds up to `through` that is not sent yet."""
        if through > self.position:
            for entry in self.store.log_entries(self.position, through):
                self.emit_logged(entry)
            self.position = max(self.position, through)

    def emit_logged(self, entry: LogEntry) -> None:
        skip = None
        if self.held:      # sockets still connecting, or ahead of this process
            self.held = {sid: upto for sid, upto in self.held.items() if upto >= entry.seq}
            skip = list(self.held) or None
        self.position = entry.seq        # before the emit, which may wait (Redis)
        try:
            self.shop.sio.emit(entry.name, self.with_offset(entry), to=audience(entry),
                               skip_sid=skip, ignore_queue=self.shared)
            if entry.name == "notification:received" and self.shop.tabs[entry.user_id]:
                self.store.mark_delivered([entry.payload["id"]])
        except Exception:
            log.exception("sending %s failed", entry.name)

    def emit_to(self, sid: str, events: list[tuple[str, dict]]) -> None:
        for name, data in events:
            self.shop.sio.emit(name, data, to=sid, ignore_queue=self.shared)

    def stop(self) -> None:
        """Send what is queued, then end the worker and the pruner."""
        self.stopping = True
        if self.worker is not None:
            self.doorbell.release()
            self.worker.wait()
            self.worker = None
        if self.pruner is not None:
            self.pruner.kill()
            self.pruner = None

    # -- catching up -------------------------------------------------------------

    def hold(self, sid: str) -> None:
        """No logged event reaches a connecting socket until it has caught up."""
        self.held[sid] = math.inf

    def release(self, sid: str) -> None:
        self.held.pop(sid, None)

    def welcome(self, connection: Connection, server_offset: Any) -> None:
        """Send what is queued, put a new socket in its rooms at that position
        of the log, and queue what it missed before it; nothing in between
        waits, so every later event reaches it live, after these."""
        self.flush()
        for room in connection.user.rooms if connection.user else ():
            self.shop.sio.enter_room(connection.sid, room)
        if server_offset is not None:
            self.catch_up(connection, server_offset)
        else:
            self.replay_undelivered(connection)

    def catch_up(self, connection: Connection, server_offset: Any) -> None:
        """Everything after `server_offset` that the socket would have
        received, then `sync`; or `sync` with complete false when the log
        cannot say (another log, too old, not an offset)."""
        after = self.seq_of(server_offset)
        with self.store.snapshot():      # another process may prune meanwhile
            newest, kept_from = self.store.last_seq(), self.store.pruned_through()
            complete = after is not None and kept_from <= after <= newest
            entries = self.store.missed(connection.user, after, self.position) if complete else []
        if complete and after > self.position:
            self.held[connection.sid] = after    # committed, and not sent yet: skip those
        else:
            self.release(connection.sid)
        notes = [e.payload["id"] for e in entries if e.name == "notification:received"]
        if notes:
            self.store.mark_delivered(notes)
        replay = [(e.name, self.with_offset(e)) for e in entries]
        sync_at = max(self.position, after) if complete else self.position
        self.send_missed(connection.sid, [*replay, ("sync", {
            "event": "sync", "offset": self.offset(sync_at), "replayed": len(replay),
            "complete": complete})])

    def replay_undelivered(self, connection: Connection) -> None:
        """Without an offset: the notifications saved while the user had no
        socket (those the log has still to send are left to it)."""
        self.release(connection.sid)
        if connection.user:
            notes = self.store.claim_undelivered(connection.user.id, self.position)
            if notes:
                self.send_missed(connection.sid, [
                    ("notification:received", note if seq is None
                     else {**note, "offset": self.offset(seq)}) for seq, note in notes])

    def enter_room(self, sid: str, room: str, since: str | None) -> tuple[bool, dict]:
        """joinRoom: (whether the socket was not in the room yet, what the
        ack says of the history). With `since`, as in `welcome`: the queue is
        sent, the socket enters, and the room's messages after `since` up to
        there are queued."""
        self.flush()
        joined = room not in self.shop.sio.rooms(sid)
        if joined:
            self.shop.sio.enter_room(sid, room)
        if since is None:
            return joined, {}
        after = self.seq_of(since)
        with self.store.snapshot():      # another process may prune meanwhile
            if after is None or after > self.store.last_seq():
                return joined, {"replayed": 0, "complete": False}
            kept_from = self.store.pruned_through()
            entries = self.store.room_messages(room, max(after, kept_from), self.position)
        if entries:
            self.send_missed(sid, [("message", self.with_offset(e)) for e in entries])
        return joined, {"replayed": len(entries), "complete": after >= kept_from}

    def leave_room(self, sid: str, room: str) -> bool:
        """leaveRoom: whether the socket was in the room. What the room was
        sent while it was a member (other processes' too) goes out first."""
        self.flush()
        if room not in self.shop.sio.rooms(sid):
            return False
        self.shop.sio.leave_room(sid, room)
        return True

    # -- retention ---------------------------------------------------------------

    def prune_forever(self) -> None:
        """Drop events older than EVENT_RETENTION, a small batch per
        transaction: no order waits long for the write lock."""
        retention = self.shop.config.event_retention_s
        while True:
            eventlet.sleep(min(PRUNE_INTERVAL_S, retention / 4))
            try:
                while self.store.prune(time.time() - retention, PRUNE_BATCH) == PRUNE_BATCH:
                    eventlet.sleep(0)
            except sqlite3.Error:
                log.exception("pruning the event log failed; trying again later")


def audience(entry: LogEntry) -> str | list[str] | None:
    """Where a logged event goes: an order's owner and the admins (a socket in
    several of these rooms still receives it once), a notification's
    recipient, a message's room, a stock update to everyone."""
    if entry.name.startswith("order:"):
        return [f"user:{entry.user_id}", *ADMIN_ROOMS]
    if entry.name == "notification:received":
        return f"user:{entry.user_id}"
    if entry.name == "product:stockUpdated":
        return None
    return entry.room


# =============================================================================
# Presence, rate limits and metrics
# =============================================================================

class Presence(Protocol):
    """Who is online and which socket ids exist: LocalPresence in one
    process, cluster.Cluster across processes through Redis."""

    def start(self, spawn: Callable, announce: Callable[[list[str], str], None]) -> None: ...
    def join(self, sid: str, user_id: str | None) -> bool: ...
    def leave(self, sid: str, user_id: str | None) -> bool: ...
    def is_socket(self, name: str) -> bool: ...
    def users_online(self) -> int: ...
    def stop(self) -> None: ...


def load_cluster(redis_url: str, connections: dict) -> Presence:
    try:
        import cluster  # Redis, and this module, only for several processes
    except ImportError:
        raise ConfigError("REDIS_URL needs the redis package:"
                          " pip install -r requirements-redis.txt") from None
    return cluster.Cluster(redis_url, connections)


def presence_update(user_id: str, status: str) -> dict:
    return {"userId": user_id, "status": status, "at": now_iso()}


class LocalPresence:
    """Presence in this one process."""

    def __init__(self, connections: dict[str, Connection]) -> None:
        self.connections = connections
        self.online: Counter[str] = Counter()       # user id -> live connections

    def start(self, spawn: Callable, announce: Callable[[list[str], str], None]) -> None:
        pass                                        # nothing runs in the background

    def join(self, sid: str, user_id: str | None) -> bool:
        """Count a new connection; True when it is the user's first."""
        if user_id is None:
            return False
        self.online[user_id] += 1
        return self.online[user_id] == 1

    def leave(self, sid: str, user_id: str | None) -> bool:
        """Count a closed connection; True when it was the user's last."""
        if user_id is None:
            return False
        self.online[user_id] -= 1
        if self.online[user_id] > 0:
            return False
        del self.online[user_id]
        return True

    def is_socket(self, name: str) -> bool:
        """A socket id: Socket.IO keeps a private room under it."""
        return name in self.connections

    def users_online(self) -> int:
        return len(self.online)

    def stop(self) -> None:
        pass


class RateLimiter:
    """Token buckets per user (per socket for anonymous) and event. With
    REDIS_URL `shared` takes the token in Redis (cluster.Cluster.take_token),
    and answers None while Redis is away: then the local bucket decides."""

    def __init__(self, limits: dict[str, tuple[int, float]] | None,
                 shared: Callable[[str, int, float], int | None] | None = None) -> None:
        self.limits, self.shared = limits, shared
        self.buckets: dict[str, dict[str, list[float]]] = defaultdict(dict)

    def check(self, who: str, event_name: str) -> None:
        """Take one token, or refuse with how long until the next one."""
        if self.limits is None:
            return
        name = event_name if event_name in self.limits else "*"
        capacity, window = self.limits[name]
        wait_ms = self.shared(f"{who}:{name}", capacity, window) if self.shared else None
        if wait_ms is not None:
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


ACK_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


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
        log_size, oldest = shop.store.log_size()
        gauges = {"connections": len(shop.connections),
                  "users_online": shop.presence.users_online(),
                  "notifications_queued": len(shop.delivery.items),
                  "event_log_events": log_size,
                  "event_log_oldest_age_seconds":
                  f"{max(0.0, time.time() - oldest):.3f}" if oldest else 0}
        lines = []
        for name, value in gauges.items():
            lines += [f"# TYPE shop_{name} gauge", f"shop_{name} {value}"]
        for name, counts in (("events_total", self.events), ("event_errors_total", self.errors)):
            lines.append(f"# TYPE shop_{name} counter")
            lines += [f'shop_{name}{{event="{e}"}} {n}' for e, n in sorted(counts.items())]
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
    committed by the time the handler acks, and hands the events it logged
    to `on_commit` (Delivery) right after its COMMIT."""

    def __init__(self, path: Path, exclusive: bool = False) -> None:
        """Open (and create) the database. Every server holds a shared lock on
        the file while it runs; `reset` needs it exclusive, so it never pulls
        the data from under a running server."""
        self.path = path
        self.users_stored: dict[str, User] = {}
        self.logged: list[LogEntry] = []             # by the open transaction
        self.on_commit: Callable[[list[LogEntry]], None] = lambda entries: None
        self.checkpointer: Any = None
        self.stop_checkpoints = eventlet.semaphore.Semaphore(0)
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
        """Copy committed pages from the WAL into the database file, in a native
        thread (eventlet.tpool): the copy ends in two fsyncs, which SQLite would
        make every few hundredth commit wait for with every socket stopped."""
        connection = connect_database(self.path)
        try:
            while not self.stop_checkpoints.acquire(timeout=CHECKPOINT_INTERVAL_S):
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
            self.stop_checkpoints.release()
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
            self.db.execute("COMMIT")
        except BaseException:
            self.logged = []                # events of a change that did not happen
            if self.db.in_transaction:      # (SQLite may have rolled back by itself)
                self.db.execute("ROLLBACK")
            raise
        if self.logged:
            entries, self.logged = self.logged, []
            self.on_commit(entries)

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """Several reads that see one state of the database (HTTP answers
        and the log position they reflect)."""
        self.db.execute("BEGIN")
        try:
            yield self.db
        finally:
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
        stamp = now_iso()
        row = {"id": new_object_id(), "user_id": user.id, "status": "pending",
               "total_cents": request.total_cents, "payment_method": request.payment_method,
               "shipping_address": None if request.shipping_address is None
               else json.dumps(request.shipping_address),
               "idempotency_key": request.idempotency_key, "created_at": stamp,
               "updated_at": stamp}
        self.db.execute(INSERT_ORDER, tuple(row.values()))
        self.db.executemany(
            "INSERT INTO order_items (order_id, position, product_id, quantity, price_cents)"
            " VALUES (?, ?, ?, ?, ?)",
            [(row["id"], n, *item) for n, item in enumerate(request.items)])
        return order_json(row, request.items)

    def order_status(self, order_id: str) -> tuple[str, str] | None:
        """(owner, status) of an order, or None if there is none."""
        row = self.db.execute("SELECT user_id, status FROM orders WHERE id = ?",
                              (order_id,)).fetchone()
        return (row["user_id"], row["status"]) if row else None

    def set_status(self, order_id: str, status: str) -> None:
        self.db.execute("UPDATE orders SET status = ?, updated_at = ? WHERE id = ?",
                        (status, now_iso(), order_id))

    def order_items(self, order_id: str) -> list[tuple[str, int, int]]:
        return [tuple(row) for row in self.db.execute(
            "SELECT product_id, quantity, price_cents FROM order_items WHERE order_id = ?"
            " ORDER BY position", (order_id,))]

    def order(self, order_id: str) -> dict | None:
        """The order in the Mongo-style JSON shape the original backend returned."""
        row = self.db.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
        return order_json(row, self.order_items(order_id)) if row else None

    def orders_page(self, user: User, status: str | None, limit: int,
                    before: int | None) -> tuple[list[dict], int | None]:
        """A page of orders, newest first (a user's own; an admin's: all), and
        the cursor of the next page. Pages follow creation order (rowid), so
        an order that changes status between two pages breaks nothing."""
        rows = self.db.execute(
            "SELECT rowid AS cursor, * FROM orders WHERE (? OR user_id = ?)"
            " AND (? IS NULL OR status = ?) AND (? IS NULL OR rowid < ?)"
            " ORDER BY rowid DESC LIMIT ?",
            (user.is_admin, user.id, status, status, before, before, limit + 1)).fetchall()
        orders = [order_json(row, self.order_items(row["id"])) for row in rows[:limit]]
        return orders, next_cursor(rows, limit)

    # -- notifications ------------------------------------------------------------

    def save_notification(self, sender: User, to_user_id: str, fields: dict) -> dict:
        """Write the notification and log it; returns it as the recipient will see it."""
        with self.transaction() as db:
            row = db.execute(
                "INSERT INTO notifications (id, to_user_id, from_user_id, type, priority,"
                " title, body, meta, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (new_object_id(), to_user_id, sender.id, fields["type"], fields["priority"],
                 fields["title"], fields["body"],
                 None if fields["meta"] is None else json.dumps(fields["meta"]),
                 now_iso())).fetchone()
            note = notification_received(row)
            self.log_event("notification:received", note, user_id=to_user_id, subject=note["id"])
        return note

    def mark_delivered(self, notification_ids: list[str]) -> None:
        with self.transaction() as db:
            db.execute(f"UPDATE notifications SET delivered_at = ? WHERE delivered_at IS NULL"
                       f" AND id IN ({','.join('?' * len(notification_ids))})",
                       (now_iso(), *notification_ids))

    def claim_undelivered(self, user_id: str, through: int) -> list[tuple[int | None, dict]]:
        """Claim what waits for a user, oldest first, with its position in the
        log: what the log has sent (up to `through`) while the user had no
        socket, or no longer keeps (no position)."""
        if not self.db.execute("SELECT 1 FROM notifications WHERE to_user_id = ?"
                               " AND delivered_at IS NULL LIMIT 1", (user_id,)).fetchone():
            return []  # the common case: a read, no write lock
        with self.transaction() as db:
            rows = db.execute(
                "SELECT n.*, e.seq FROM notifications n LEFT JOIN events e ON e.subject = n.id"
                " WHERE to_user_id = ? AND delivered_at IS NULL AND (e.seq IS NULL OR e.seq <= ?)"
                " ORDER BY n.created_at, n.rowid", (user_id, through)).fetchall()
            db.executemany("UPDATE notifications SET delivered_at = ? WHERE id = ?",
                           [(now_iso(), row["id"]) for row in rows])
        return [(row["seq"], notification_received(row)) for row in rows]

    def notifications_page(self, user_id: str, limit: int,
                           before: int | None) -> tuple[list[dict], int | None]:
        rows = self.db.execute(
            "SELECT rowid AS cursor, * FROM notifications WHERE to_user_id = ?"
            " AND (? IS NULL OR rowid < ?) ORDER BY rowid DESC LIMIT ?",
            (user_id, before, before, limit + 1)).fetchall()
        return [notification_received(row) for row in rows[:limit]], next_cursor(rows, limit)

    # -- the event log ------------------------------------------------------------

    def log_event(self, name: str, payload: dict, user_id: str | None = None,
                  room: str | None = None, subject: str | None = None) -> None:
        """Write a durable event in the open transaction (the outbox): it is
        sent once that commits, and kept for catch-up. Outside a transaction,
        the one INSERT is a transaction of its own (a chat message)."""
        text = COMPACT_JSON.encode(payload)
        seq = self.db.execute(
            "INSERT INTO events (name, user_id, room, subject, payload, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (name, user_id, room, subject, text, time.time())).lastrowid
        entry = LogEntry(seq, name, payload, text, user_id, room)
        if self.db.in_transaction:
            self.logged.append(entry)
        else:
            self.on_commit([entry])

    def log_id(self) -> str:
        return self.db.execute("SELECT log_id FROM event_log").fetchone()[0]

    def last_seq(self) -> int:
        """The newest position of the log (committed), 0 for a new one."""
        return self.db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]

    def pruned_through(self) -> int:
        """Every event up to here may be gone: offsets before it are incomplete."""
        return self.db.execute("SELECT pruned_through FROM event_log").fetchone()[0]

    def log_entries(self, after: int, through: int) -> list[LogEntry]:
        return self.entries("seq > ? AND seq <= ?", (after, through))

    def missed(self, user: User | None, after: int, through: int) -> list[LogEntry]:
        """What a socket of `user` would have received between two positions:
        its own orders' events (an admin: every order's), its notifications,
        every stock update; no room message (a new socket is in no room)."""
        return self.entries(
            "seq > ? AND seq <= ? AND (name = 'product:stockUpdated' OR user_id = ?"
            " OR (? AND name IN ('order:created', 'order:updated')))",
            (after, through, user.id if user else None, bool(user and user.is_admin)))

    def room_messages(self, room: str, after: int, through: int) -> list[LogEntry]:
        return self.entries("room = ? AND seq > ? AND seq <= ?", (room, after, through))

    def entries(self, where: str, args: tuple) -> list[LogEntry]:
        return [LogEntry(row[0], row[1], json.loads(row[2]), row[2], row[3], row[4])
                for row in self.db.execute(
                    f"SELECT seq, name, payload, user_id, room FROM events WHERE {where}"
                    " ORDER BY seq", args)]

    def prune(self, older_than: float, batch: int) -> int:
        """Drop up to `batch` of the oldest events logged before `older_than`;
        never the newest, whose position the next event's follows."""
        with self.transaction() as db:
            gone = [row[0] for row in db.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE created_at < ?"
                " AND seq < (SELECT max(seq) FROM events) ORDER BY seq LIMIT ?) RETURNING seq",
                (older_than, batch))]
            if gone:
                db.execute("UPDATE event_log SET pruned_through = max(pruned_through, ?)",
                           (max(gone),))
        return len(gone)

    def log_size(self) -> tuple[int, float | None]:
        """How many events the log keeps, and when the oldest was written."""
        return tuple(self.db.execute("SELECT count(*), min(created_at) FROM events").fetchone())

    # -- a fresh workshop -----------------------------------------------------------

    def reset(self) -> dict[str, int]:
        """No orders, notifications or users, the demo catalogue at its seeded
        stock and prices, and a new event log (an old offset is unknown to it).
        Returns the rows removed."""
        with self.transaction() as db:
            removed = {table: db.execute(f"DELETE FROM {table}").rowcount
                       for table in ("order_items", "orders", "notifications", "users", "events")}
            db.execute(
                "INSERT INTO products (id, name, price_cents, stock)"
                " SELECT id, name, price_cents, stock FROM demo_catalogue WHERE true"
                " ON CONFLICT (id) DO UPDATE SET name = excluded.name,"
                " price_cents = excluded.price_cents, stock = excluded.stock")
            db.execute("UPDATE event_log SET log_id = ?, pruned_through = 0",
                       (secrets.token_hex(4),))
        return removed


INSERT_ORDER = ("INSERT INTO orders (id, user_id, status, total_cents, payment_method,"
                " shipping_address, idempotency_key, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


def next_cursor(rows: list[sqlite3.Row], limit: int) -> int | None:
    """A page query reads one row more than it returns: there is a next page
    if it came, and it starts before the page's last row."""
    return rows[limit - 1]["cursor"] if len(rows) > limit else None


def connect_database(path: Path) -> sqlite3.Connection:
    """Autocommit mode (transactions are explicit), usable from the checkpoint
    thread, and waiting for other processes' locks (they may share the file)."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    return connection


def order_json(row: Mapping, items: Iterable[tuple[str, int, int]]) -> dict:
    """An order as the original Mongo backend returned it."""
    return {
        "_id": row["id"], "user": row["user_id"],
        "items": [{"product": product_id, "quantity": quantity, "price": from_cents(price)}
                  for product_id, quantity, price in items],
        "shippingAddress": json.loads(row["shipping_address"]) if row["shipping_address"]
        else None,
        "paymentMethod": row["payment_method"], "total": from_cents(row["total_cents"]),
        "status": row["status"], "createdAt": row["created_at"], "updatedAt": row["updated_at"],
    }


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

    @property
    def rooms(self) -> list[str]:
        """The rooms the server puts this user's sockets in."""
        return [f"user:{self.id}", *(ADMIN_ROOMS if self.is_admin else ())]


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
# Plain JSON as browsers read it (no NaN or Infinity), compact; made once, as
# json.dumps with arguments builds a new encoder on every call.
COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
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


def argument_problem(packet: str, data: list) -> str | None:
    """Why an event's arguments cannot be taken (adapters.LenientPacket asks,
    for every event packet); a packet without a backslash-u needs no search."""
    if not MAYBE_UNSAFE.search(packet):
        return None
    arguments = data[1] if len(data) == 2 else data[1:]
    return unsafe_text(data[0], "the event name") or unsafe_text(arguments)


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


def optional(data: dict, key: str, kind: type, limit: int) -> Any:
    """An optional field (absent or null: None): a string of at most `limit`
    characters, or an object of at most `limit` bytes as plain JSON."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, kind):
        raise invalid(f"{key} must be {'a string' if kind is str else 'an object'}")
    if kind is str:
        size, unit = len(value), "characters"
    else:
        try:
            size = len(COMPACT_JSON.encode(value).encode())
        except ValueError:  # NaN or Infinity, which Python reads and JSON.parse does not
            raise invalid(f"{key} must be plain JSON (no binary data, NaN or Infinity)") from None
        unit = "bytes as JSON"
    if size > limit:
        raise invalid(f"{key} must be at most {limit} {unit}")
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
        for key in ("price", "quantity"):
            if item.get(key) is None:
                raise Refusal(f"items.{n}.{key}: Path '{key}' is required")
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
        shipping_address=optional(data, "shippingAddress", dict,
                                  SHIPPING_ADDRESS_MAX_BYTES),
        payment_method=optional(data, "paymentMethod", str, PAYMENT_METHOD_MAX),
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
                        "title": optional(data, "title", str, TITLE_MAX),
                        "body": optional(data, "body", str, BODY_MAX),
                        "meta": optional(data, "meta", dict, META_MAX_BYTES),
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
# HTTP routes
# =============================================================================

CLIENT_SCRIPT_URL = "/vendor/socket.io.min.js"
ADMIN_UI_URL = "/admin-ui/"


def respond(start_response: Callable, status: str, body: str | bytes,
            content_type: str = "application/json", *headers: tuple[str, str]) -> list[bytes]:
    data = body.encode() if isinstance(body, str) else body
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(data))),
                            ("Cache-Control", "no-store"), *headers])
    return [data]


def not_found(start_response: Callable) -> list[bytes]:
    return json_response(start_response, {"error": "Not found"}, "404 Not Found")


def static_file(start_response: Callable, path: Path,
                content_type: str | None = None) -> list[bytes]:
    content_type = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return respond(start_response, "200 OK", path.read_bytes(), content_type)


def json_response(start_response: Callable, value: Any, status: str = "200 OK") -> list[bytes]:
    return respond(start_response, status, json.dumps(value))


def project_file(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    """A file of PROJECT_FILES, as it is (only the client script may be missing)."""
    path, content_type = PROJECT_FILES[environ.get("PATH_INFO", "/")]
    if not path.exists():
        return not_found(start_response)
    return static_file(start_response, path, content_type)


def health(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    return json_response(start_response, {"ok": True})


def products(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    """The catalogue, and in X-Log-Offset the log position it reflects: an
    anonymous client's starting point for auth.serverOffset."""
    with shop.store.snapshot():
        catalogue, at = shop.store.products(), shop.store.last_seq()
    return respond(start_response, "200 OK", json.dumps(catalogue), "application/json",
                   ("X-Log-Offset", shop.delivery.offset(at)))


# -- state on load: read-only, with the socket's token and error strings ---------

HTTP_STATUS = {"Unauthorized": "401 Unauthorized", "Access denied": "403 Forbidden",
               "Order not found": "404 Not Found"}      # any other Refusal: 400


def caller(shop: Shop, environ: dict) -> User:
    """The user of an Authorization header, verified as the socket verifies
    tokens. A token in the query string is ignored: URLs are logged."""
    user, why = authenticate(environ.get("HTTP_AUTHORIZATION"), shop.secret)
    if user is None:
        raise Refusal("Unauthorized", reason=why)
    return user


def page(environ: dict) -> tuple[dict[str, str], int, int | None]:
    """The query (first value of each), `limit` and the `before` cursor."""
    query = {key: values[0] for key, values in
             parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}
    limit = query.get("limit", str(PAGE_DEFAULT))
    if not (limit.isascii() and limit.isdigit() and len(limit.lstrip("0")) <= 3
            and 1 <= int(limit) <= PAGE_MAX):
        raise invalid(f"limit must be a whole number from 1 to {PAGE_MAX}")
    before = query.get("before")
    if before is not None and not (before.isascii() and before.isdigit() and len(before) < 19):
        raise invalid("before must be the next cursor of a previous page")
    return query, int(limit), None if before is None else int(before)


def api_orders(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    user = caller(shop, environ)
    query, limit, before = page(environ)
    status = query.get("status")
    if status is not None and status not in STATUSES:
        raise invalid(f"status must be one of {', '.join(STATUSES)}")
    with shop.store.snapshot():
        orders, after = shop.store.orders_page(user, status, limit, before)
        at = shop.store.last_seq()
    return json_response(start_response, {"orders": orders, "offset": shop.delivery.offset(at),
                                          "next": None if after is None else str(after)})


def api_order(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    user = caller(shop, environ)
    # PATH_INFO comes percent-decoded, as latin-1 (PEP 3333): the UTF-8 it was.
    raw = environ["PATH_INFO"].removeprefix(ORDER_URL).encode("latin-1")
    order_id = object_id(raw.decode("utf-8", "replace"), "_id")
    with shop.store.snapshot():
        order, at = shop.store.order(order_id), shop.store.last_seq()
    if order is None:
        raise Refusal("Order not found")
    if not (user.is_admin or order["user"] == user.id):
        raise Refusal("Access denied")
    return json_response(start_response, {"order": order, "offset": shop.delivery.offset(at)})


def api_notifications(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    user = caller(shop, environ)
    _, limit, before = page(environ)
    with shop.store.snapshot():
        notes, after = shop.store.notifications_page(user.id, limit, before)
        at = shop.store.last_seq()
    return json_response(start_response, {"notifications": notes,
                                          "offset": shop.delivery.offset(at),
                                          "next": None if after is None else str(after)})


def prometheus(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    return respond(start_response, "200 OK", shop.metrics.render(shop), "text/plain; version=0.0.4")


def server_info(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    """What the tester page may offer: dev tokens, the local client script, the Admin UI."""
    return json_response(start_response, {
        "devTokens": not shop.config.jwt_secret,
        "clientScript": CLIENT_SCRIPT_URL if CLIENT_SCRIPT.exists() else None,
        "adminUi": ADMIN_UI_URL if shop.config.admin_ui and ADMIN_UI_DIR.exists() else None,
    })


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
    return (name == "localhost" or name in allowed_hosts or "*" in allowed_hosts
            or is_ip_address(name))


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


ROUTES = {"/": project_file, "/health": health, "/api/products": products,
          "/api/orders": api_orders, "/api/notifications": api_notifications,
          "/asyncapi.json": project_file, "/openapi.json": project_file,
          "/api/info": server_info, "/metrics": prometheus, "/dev/token": dev_token,
          CLIENT_SCRIPT_URL: project_file}
ORDER_URL = "/api/orders/"                # + an order id: api_order

# Routes that no page of another origin may read: no CORS header, whatever CORS_ORIGINS says.
SAME_ORIGIN_ROUTES = {"/dev/token"}


def http_app(shop: Shop, environ: dict, start_response: Callable) -> list[bytes]:
    def start_with_cors(status: str, headers: list) -> Any:
        """The same CORS_ORIGINS as the Socket.IO endpoint."""
        origin = environ.get("HTTP_ORIGIN")
        if path not in SAME_ORIGIN_ROUTES:
            if shop.config.cors_origins == "*":
                headers.append(("Access-Control-Allow-Origin", "*"))
            elif origin in shop.config.cors_origins:
                headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
            headers.append(("Access-Control-Expose-Headers", "X-Log-Offset"))
        return start_response(status, headers)

    path, method = environ.get("PATH_INFO", "/"), environ["REQUEST_METHOD"]
    route = admin_ui if path.startswith(ADMIN_UI_URL) else \
        api_order if path.startswith(ORDER_URL) else ROUTES.get(path)
    if route is None:
        return not_found(start_with_cors)
    if method == "OPTIONS" and path not in SAME_ORIGIN_ROUTES:
        # A CORS preflight: a page on another port may send Authorization.
        return respond(start_with_cors, "204 No Content", b"", "text/plain",
                       ("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS"),
                       ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
                       ("Access-Control-Max-Age", "600"))
    if method not in ("GET", "HEAD"):
        allowed = "GET, HEAD" if path in SAME_ORIGIN_ROUTES else "GET, HEAD, OPTIONS"
        return respond(start_with_cors, "405 Method Not Allowed", '{"error": "Method not allowed"}',
                       "application/json", ("Allow", allowed))
    try:
        body = route(shop, environ, start_with_cors)
    except Refusal as refusal:
        body = json_response(start_with_cors, refusal.ack,
                             HTTP_STATUS.get(refusal.ack["error"], "400 Bad Request"))
    return [] if method == "HEAD" else body        # HEAD: the headers alone


# =============================================================================
# Settings
# =============================================================================

HERE = Path(__file__).resolve().parent
SCHEMA_FILE = HERE / "schema.sql"
# The pinned socket.io-client browser build, shipped in vendor/ so that the
# tester works offline from pip alone; the Admin UI comes with `npm ci`.
CLIENT_SCRIPT = HERE / "vendor" / "socket.io.min.js"
ADMIN_UI_DIR = HERE / "node_modules" / "@socket.io" / "admin-ui" / "ui" / "dist"
# What project_file serves: URL -> (file, content type; None: guessed from the name).
PROJECT_FILES = {"/": (HERE / "ws-tester.html", "text/html; charset=utf-8"),
                 "/asyncapi.json": (HERE / "asyncapi.json", "application/json"),  # AsyncAPI 3
                 "/openapi.json": (HERE / "openapi.json", "application/json"),    # OpenAPI 3.1
                 CLIENT_SCRIPT_URL: (CLIENT_SCRIPT, None)}

DEFAULT_TOKEN_TTL = "24h"
SECRET_SUFFIX = ".secret"
SQLITE_BUSY_TIMEOUT_MS = 5000
CHECKPOINT_INTERVAL_S = 0.5        # how often the WAL is copied into the database file
MAX_CONNECTIONS = 100_000          # eventlet's WSGI server would stop at 1024
LISTEN_BACKLOG = 1024
SHUTDOWN_POLL_S = 0.2
SHUTDOWN_FLUSH_S = 0.3             # lets writer greenlets send the last emits
PRUNE_INTERVAL_S = 60.0            # (or a quarter of the retention, if shorter)
PRUNE_BATCH = 500                  # events per pruning transaction
FOLLOW_INTERVAL_S = 0.025          # with REDIS_URL: how often the log is read for others' events


class ConfigError(Exception):
    """A setting the server cannot run with; main() prints it and exits 2."""


@dataclass(frozen=True)
class Config:
    """Every setting, with its default; `--help` lists where each comes from."""
    host: str = "127.0.0.1"
    port: int = 8000
    database: Path = Path("app.db")
    jwt_secret: str | None = None            # None: the dev secret in <db>.secret
    redis_url: str | None = None
    cors_origins: str | list[str] = "*"
    require_auth: bool = False
    max_payload_bytes: int = 100_000
    rate_limits: dict[str, tuple[int, float]] | None = field(
        default_factory=lambda: dict(DEFAULT_RATE_LIMITS))
    notify_queue: bool = True
    admin_ui: tuple[str, str] | None = None
    connect_timeout_s: float = 45.0          # Engine.IO open, no CONNECT: closed (as socket.io)
    allowed_hosts: tuple[str, ...] = ()      # host names that may ask for dev tokens
    event_retention_s: float = 86400.0       # how long the event log keeps events
    allow_untested_libraries: bool = False
    verbose: bool = False


def load_config(args: argparse.Namespace, env: Mapping[str, str]) -> Config:
    """Flags win over environment variables, which win over defaults."""
    max_payload = env.get("MAX_PAYLOAD_BYTES", str(Config.max_payload_bytes))
    if not max_payload.isdigit() or int(max_payload) < 1000:
        raise ConfigError(f"MAX_PAYLOAD_BYTES must be a whole number >= 1000, got {max_payload!r}")
    admin_ui = None
    if env.get("ADMIN_UI"):
        user, colon, password = env["ADMIN_UI"].partition(":")
        if not (user and colon and password):
            raise ConfigError("ADMIN_UI must be user:password")
        admin_ui = (user, password)
    origins = env.get("CORS_ORIGINS", "*").strip() or "*"
    connect_timeout = parse_duration(
        env.get("CONNECT_TIMEOUT", f"{Config.connect_timeout_s:g}s"), "CONNECT_TIMEOUT")
    retention = parse_duration(
        env.get("EVENT_RETENTION", f"{Config.event_retention_s:g}s"), "EVENT_RETENTION")
    port = env.get("PORT", str(Config.port)) if getattr(args, "port", None) is None \
        else str(args.port)
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"port must be a number from 0 to 65535, got {port!r}")
    return Config(
        host=getattr(args, "host", None) or env.get("HOST", Config.host),
        port=int(port),
        database=Path(getattr(args, "db", None) or env.get("DATABASE") or Config.database),
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
        event_retention_s=retention,
        allow_untested_libraries=getattr(args, "allow_untested_libraries", False)
        or parse_flag("ALLOW_UNTESTED_LIBRARIES", env.get("ALLOW_UNTESTED_LIBRARIES", "0")),
        verbose=getattr(args, "verbose", False),
    )


def parse_flag(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {text!r}")


def parse_duration(text: str, setting: str = "") -> float:
    """'500ms', '10s', '5m', '24h', '7d' or plain seconds -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", text.strip())
    if not match or float(match[1]) <= 0:
        where = f"{setting}: " if setting else ""
        raise ConfigError(f"{where}bad duration {text!r} (use e.g. 10s, 5m, 24h)")
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
        limits[event_name] = (count, parse_duration(window, "RATE_LIMITS"))
    return limits


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


def check_libraries(cfg: Config) -> None:
    """adapters.py reaches into the libraries' insides as of the versions it
    was tested with; another version may change what a method does under the
    same name (frames unchecked, packets misread). Refuse it, saying what to
    install, unless told to run anyway."""
    differ = adapters.check_versions()
    if not differ:
        return
    what = ", ".join(differ)
    if not cfg.allow_untested_libraries:
        raise ConfigError(f"installed {what}: this server is tested with the versions in"
                          " requirements.txt (pip install -r requirements.txt), or run anyway"
                          " with --allow-untested-libraries")
    log.warning("running with untested %s (--allow-untested-libraries)", what)


def serve(cfg: Config) -> int:
    """Build the shop, listen, and run until SIGINT or SIGTERM; then stop
    accepting, deliver queued notifications and close the database."""
    check_libraries(cfg)
    secret = load_secret(cfg)
    shop = Shop(cfg, secret)
    adapters.install_speedups(cfg.max_payload_bytes)
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
  EVENT_RETENTION       how long the event log keeps events for catch-up (default 24h)
  ALLOW_UNTESTED_LIBRARIES=1  as --allow-untested-libraries
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="server.py", description=__doc__.split("\n\n")[0],
                                     epilog=ENVIRONMENT_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help=f"bind address (HOST, default {Config.host})")
    parser.add_argument("--port", help=f"port, 0 for any free one (PORT, default {Config.port})")
    parser.add_argument("--db", help=f"SQLite file (DATABASE, default {Config.database})")
    parser.add_argument("--require-auth", action="store_true",
                        help="refuse connections without a valid token (REQUIRE_AUTH=1)")
    parser.add_argument("--verbose", action="store_true", help="log every event and request")
    parser.add_argument("--allow-untested-libraries", action="store_true",
                        help="run with versions of python-socketio, python-engineio or eventlet"
                        " other than requirements.txt pins (ALLOW_UNTESTED_LIBRARIES=1)")
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
