"""Shop Realtime: a Socket.IO server for an e-commerce real-time protocol.

Rooms and chat, presence, personal notifications, orders with status changes
and stock updates, over python-socketio hosted by eventlet, stored in SQLite.
The protocol is described in README.md; this file reads top to bottom:

    configuration -> storage -> auth -> validation -> rate limits ->
    event handlers (in protocol order) -> notification worker ->
    HTTP routes -> command line

Run it with ``python server.py``; ``python server.py --help`` lists the options.
"""

# eventlet must patch the standard library before anything else imports it.
# Its deprecation notice is documented in README.md rather than printed on
# every start.
import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
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
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import eventlet.queue
import eventlet.tpool
import eventlet.websocket
import eventlet.wsgi
import jwt
import socketio
from engineio.async_drivers import eventlet as engineio_eventlet
from engineio.payload import Payload

# PyJWT warns on every decode with a short HS256 key; the server warns once at
# start instead (see load_secret).
warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)

# =============================================================================
# Configuration
# =============================================================================

HERE = Path(__file__).resolve().parent
SCHEMA_FILE = HERE / "schema.sql"
TESTER_FILE = HERE / "ws-tester.html"
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
        event, count, window = match[1], int(match[2]), match[3]
        if event not in HANDLED_EVENTS and event != "*":
            raise ConfigError(f"RATE_LIMITS: unknown event {event!r}")
        if count < 1:
            raise ConfigError(f"RATE_LIMITS: {event} needs at least 1 event per window")
        try:
            limits[event] = (count, parse_duration(window))
        except ConfigError as error:
            raise ConfigError(f"RATE_LIMITS: {error}") from None
    return limits


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
        connect_timeout = parse_duration(env.get("CONNECT_TIMEOUT", f"{DEFAULT_CONNECT_TIMEOUT_S:g}s"))
    except ConfigError as error:
        raise ConfigError(f"CONNECT_TIMEOUT: {error}") from None
    return Config(
        host=getattr(args, "host", None) or env.get("HOST", DEFAULT_HOST),
        port=parse_port(str(args.port) if getattr(args, "port", None) is not None
                        else env.get("PORT", str(DEFAULT_PORT))),
        database=Path(args.db or env.get("DATABASE") or DEFAULT_DATABASE),
        jwt_secret=env.get("JWT_SECRET") or None,
        redis_url=env.get("REDIS_URL") or None,
        cors_origins="*" if origins == "*" else [o.strip() for o in origins.split(",") if o.strip()],
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


config = Config()  # replaced by main() before anything is served


# =============================================================================
# Storage
# =============================================================================

class Refusal(Exception):
    """An expected failure. It becomes the ack {"error": message, **detail}."""

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.ack = {"error": message, **detail}


def invalid(detail: str) -> Refusal:
    return Refusal("Invalid payload", detail=detail)


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


@dataclass(frozen=True)
class OrderRequest:
    items: list[tuple[str, int, int]]          # (product id, quantity, price in cents)
    total_cents: int
    shipping_address: dict | None = None
    payment_method: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class StockChange:
    product_id: str
    stock: int
    delta: int


class Storage:
    """All SQL lives here. Each method is one short transaction that has
    committed by the time it returns, so callers may emit straight after."""

    def __init__(self) -> None:
        self.db: sqlite3.Connection | None = None
        self.path: Path | None = None
        self.users_stored: dict[str, User] = {}
        self.checkpointer: Any = None
        self.file_lock: Any = None
        self.stop_checkpoints: eventlet.queue.LightQueue = eventlet.queue.LightQueue()

    def open(self, path: Path, exclusive: bool = False) -> None:
        """Open (and create) the database. Every server holds a shared lock on
        the file while it runs; `reset` needs it exclusive, so it never pulls
        the data from under a running server."""
        self.db, self.path = connect_database(path), path
        self.file_lock = path.open("rb")
        try:
            fcntl.flock(self.file_lock, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                        | fcntl.LOCK_NB)
        except BlockingIOError:
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

    def reset(self) -> dict[str, int]:
        """A fresh workshop: no orders, notifications or users, and the demo
        catalogue at its seeded stock and prices. Returns the rows removed."""
        with self.transaction() as db:
            removed = {table: db.execute(f"DELETE FROM {table}").rowcount
                       for table in ("order_items", "orders", "notifications", "users")}
            db.execute(
                "INSERT INTO products (id, name, price_cents, stock)"
                " SELECT id, name, price_cents, stock FROM demo_catalogue WHERE true"
                " ON CONFLICT (id) DO UPDATE SET name = excluded.name,"
                " price_cents = excluded.price_cents, stock = excluded.stock")
        return removed

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

    # -- orders -----------------------------------------------------------------

    def create_order(self, user: User, request: OrderRequest) -> tuple[dict, bool]:
        """Validate against the catalogue and write the order with its items.
        Returns (order, duplicate); a duplicate is the original of a retry."""
        with self.transaction() as db:
            if request.idempotency_key is not None:
                row = db.execute("SELECT id FROM orders WHERE user_id = ? AND idempotency_key = ?",
                                 (user.id, request.idempotency_key)).fetchone()
                if row:
                    return self._order(row["id"]), True
            products = {}
            for n, (product_id, _, price_cents) in enumerate(request.items):
                product = products.get(product_id) or db.execute(
                    "SELECT price_cents, stock FROM products WHERE id = ?", (product_id,)).fetchone()
                if product is None:
                    raise Refusal(f"Product not found: {product_id}")
                if price_cents != product["price_cents"]:
                    raise Refusal(f"Price mismatch for items.{n} "
                                  f"(catalogue price {from_cents(product['price_cents'])})")
                products[product_id] = product
            expected = sum(quantity * price for _, quantity, price in request.items)
            if request.total_cents != expected:
                raise Refusal(f"Total mismatch (expected {from_cents(expected)})")
            for product_id, quantity in quantities(request.items).items():
                if quantity > products[product_id]["stock"]:
                    raise Refusal(f"Insufficient stock for product {product_id}")
            order_id, stamp = new_object_id(), now_iso()
            db.execute(
                "INSERT INTO orders (id, user_id, status, total_cents, shipping_address,"
                " payment_method, idempotency_key, created_at, updated_at)"
                " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                (order_id, user.id, request.total_cents,
                 None if request.shipping_address is None else json.dumps(request.shipping_address),
                 request.payment_method, request.idempotency_key, stamp, stamp))
            db.executemany(
                "INSERT INTO order_items (order_id, position, product_id, quantity, price_cents)"
                " VALUES (?, ?, ?, ?, ?)",
                [(order_id, n, *item) for n, item in enumerate(request.items)])
        # The order as written, without reading it back.
        return {
            "_id": order_id, "user": user.id,
            "items": [{"product": product_id, "quantity": quantity, "price": from_cents(price)}
                      for product_id, quantity, price in request.items],
            "shippingAddress": request.shipping_address, "paymentMethod": request.payment_method,
            "total": from_cents(request.total_cents), "status": "pending",
            "createdAt": stamp, "updatedAt": stamp,
        }, False

    def update_order_status(self, user: User, order_id: str, status: Any
                            ) -> tuple[dict, bool, list[StockChange]]:
        """Apply one status change and its stock movement, all or nothing.
        Returns (order, changed, stock changes)."""
        with self.transaction() as db:
            row = db.execute("SELECT user_id, status FROM orders WHERE id = ?",
                             (order_id,)).fetchone()
            if row is None:
                raise Refusal("Order not found")
            if not (user.is_admin or row["user_id"] == user.id):
                raise Refusal("Access denied")
            if status not in STATUSES:
                raise Refusal("Invalid status")
            current = row["status"]
            if status == current:
                return self._order(order_id), False, []
            if status not in TRANSITIONS[current]:
                raise Refusal(f"Invalid status transition: {current} -> {status}")
            if not user.is_admin and status not in OWNER_MAY_SET:
                raise Refusal("Access denied")
            changes = []
            if status == "paid":
                changes = self._move_stock(order_id, sign=-1)
            elif current == "paid" and status == "cancelled":
                changes = self._move_stock(order_id, sign=+1)
            db.execute("UPDATE orders SET status = ?, updated_at = ? WHERE id = ?",
                       (status, now_iso(), order_id))
            return self._order(order_id), True, changes

    def _move_stock(self, order_id: str, sign: int) -> list[StockChange]:
        """Take (sign -1) or return (+1) every item's quantity. The CHECK-like
        `stock >= ?` guard makes an oversell impossible even if two writers raced."""
        items = self.db.execute(
            "SELECT product_id, quantity, price_cents FROM order_items"
            " WHERE order_id = ? ORDER BY position", (order_id,)).fetchall()
        changes = []
        for product_id, quantity in quantities(items).items():
            row = self.db.execute(
                "UPDATE products SET stock = stock + ? WHERE id = ? AND stock + ? >= 0"
                " RETURNING stock", (sign * quantity, product_id, sign * quantity)).fetchone()
            if row is None:
                raise Refusal(f"Insufficient stock for product {product_id}")
            changes.append(StockChange(product_id, row["stock"], sign * quantity))
        return changes

    def _order(self, order_id: str) -> dict:
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


def quantities(items: list) -> dict[str, int]:
    """Quantity per product, so a product listed twice moves stock once."""
    total: Counter[str] = Counter()
    for product_id, quantity, _ in items:
        total[product_id] += quantity
    return total


store = Storage()


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


jwt_secret = ""  # set by main()


def issue_token(secret: str, user_id: str, role: str = "user", email: str | None = None,
                name: str | None = None, ttl_s: float = 86400) -> str:
    claims: dict[str, Any] = {"sub": user_id, "role": role, "iat": int(time.time()),
                              "exp": int(time.time() + ttl_s)}
    if email:
        claims["email"] = email
    if name:
        claims["name"] = name
    return "Bearer " + jwt.encode(claims, secret, algorithm="HS256")


def authenticate(token: Any) -> tuple[User | None, str]:
    """(user, "") for a good token, else (None, why): no token, token expired
    or invalid token. HS256 is pinned, so `alg: none` and RS/HS confusion fail."""
    token = BEARER.sub("", token).strip() if isinstance(token, str) else token
    if token is None or token == "":
        return None, "no token"
    if not isinstance(token, str) or UNSAFE_CHARACTER.search(token):
        return None, "invalid token"
    try:
        claims = jwt.decode(
            token, jwt_secret, algorithms=["HS256"], leeway=30,
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
# Validation
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
    text = value if isinstance(value, str) else json.dumps(value) if value is not None else "undefined"
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


def is_reserved_room(room: str) -> bool:
    """Rooms the server puts sockets in; joining one would let a client read
    what is meant for someone else."""
    return room in ADMIN_ROOMS or room.startswith("user:") or cluster.is_socket(room)


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


# =============================================================================
# Rate limits
# =============================================================================

class RateLimiter:
    """Token buckets per user (per socket for anonymous) and event; shared by
    every process through Redis when there is one (see Cluster)."""

    def __init__(self) -> None:
        self.limits: dict[str, tuple[int, float]] | None = dict(DEFAULT_RATE_LIMITS)
        self.buckets: dict[str, dict[str, list[float]]] = defaultdict(dict)

    def check(self, who: str, event: str) -> None:
        """Take one token, or refuse with how long until the next one."""
        if self.limits is None:
            return
        name = event if event in self.limits else "*"
        capacity, window = self.limits[name]
        wait_ms = cluster.take_token(f"{who}:{name}", capacity, window)
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


limiter = RateLimiter()


# =============================================================================
# Presence, socket ids and shared limits (one process, or many through Redis)
# =============================================================================

PRESENCE_HEARTBEAT_S = 1.0       # each process says it is alive this often...
PRESENCE_TTL_MS = 4000           # ...and counts as dead this long after its last word
REDIS_TIMEOUT_S = 1.0
REDIS_PREFIX = "shop:"

# Every script runs atomically in Redis, so two processes never interleave.
# KEYS: online (user -> connections, all processes), sids (all socket ids),
#       this process's users hash, this process's sids set.
JOIN_SCRIPT = """
redis.call('SADD', KEYS[2], ARGV[1]); redis.call('SADD', KEYS[4], ARGV[1])
if ARGV[2] == '' then return -1 end
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
return redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
"""
LEAVE_SCRIPT = """
redis.call('SREM', KEYS[2], ARGV[1]); redis.call('SREM', KEYS[4], ARGV[1])
if ARGV[2] == '' then return -1 end
if redis.call('HINCRBY', KEYS[3], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[3], ARGV[2]) end
local total = redis.call('HINCRBY', KEYS[1], ARGV[2], -1)
if total <= 0 then redis.call('HDEL', KEYS[1], ARGV[2]) end
return total
"""
# Replace this process's share with what it really has (after Redis was away or
# restarted) and say which users that brought online or took offline.
SYNC_SCRIPT = """
local state = cjson.decode(ARGV[1])
local came, went, before = {}, {}, {}
local old = redis.call('HGETALL', KEYS[3])
for i = 1, #old, 2 do before[old[i]] = tonumber(old[i + 1]) end
for user, n in pairs(state.users) do
  local delta = n - (before[user] or 0)
  before[user] = nil
  if delta ~= 0 then
    local total = redis.call('HINCRBY', KEYS[1], user, delta)
    if total - delta <= 0 and total > 0 then table.insert(came, user) end
  end
end
for user, n in pairs(before) do
  if redis.call('HINCRBY', KEYS[1], user, -n) <= 0 then
    redis.call('HDEL', KEYS[1], user); table.insert(went, user)
  end
end
redis.call('DEL', KEYS[3])
for user, n in pairs(state.users) do redis.call('HSET', KEYS[3], user, n) end
for _, sid in ipairs(redis.call('SMEMBERS', KEYS[4])) do redis.call('SREM', KEYS[2], sid) end
redis.call('DEL', KEYS[4])
for _, sid in ipairs(state.sids) do redis.call('SADD', KEYS[2], sid); redis.call('SADD', KEYS[4], sid) end
return {came, went}
"""
# KEYS: online, sids, processes; ARGV: key prefix, this process, alive ttl (ms).
# Renews this process and retires every process that stopped renewing (killed):
# its connections are taken off, and the users left with none are returned.
HEARTBEAT_SCRIPT = """
local fresh = redis.call('SET', ARGV[1] .. ARGV[2] .. ':alive', '1', 'PX', ARGV[3], 'XX') == false
if fresh then redis.call('SET', ARGV[1] .. ARGV[2] .. ':alive', '1', 'PX', ARGV[3]) end
redis.call('SADD', KEYS[3], ARGV[2])
local offline = {}
for _, process in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if process ~= ARGV[2] and redis.call('EXISTS', ARGV[1] .. process .. ':alive') == 0 then
    local users = redis.call('HGETALL', ARGV[1] .. process .. ':users')
    for i = 1, #users, 2 do
      if redis.call('HINCRBY', KEYS[1], users[i], -tonumber(users[i + 1])) <= 0 then
        redis.call('HDEL', KEYS[1], users[i]); table.insert(offline, users[i])
      end
    end
    for _, sid in ipairs(redis.call('SMEMBERS', ARGV[1] .. process .. ':sids')) do
      redis.call('SREM', KEYS[2], sid)
    end
    redis.call('DEL', ARGV[1] .. process .. ':users', ARGV[1] .. process .. ':sids')
    redis.call('SREM', KEYS[3], process)
  end
end
return {fresh and 1 or 0, offline}
"""
# KEYS: the bucket; ARGV: capacity, tokens per ms, now (ms), ttl (ms).
# Returns 0 when a token was taken, else the milliseconds until the next one.
TAKE_TOKEN_SCRIPT = """
local capacity, rate, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = math.min(capacity, (tonumber(bucket[1]) or capacity)
                        + (now - (tonumber(bucket[2]) or now)) * rate)
local wait = 0
if tokens < 1 then wait = math.ceil((1 - tokens) / rate) else tokens = tokens - 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return wait
"""


class Cluster:
    """Who is online, which socket ids exist, and the rate-limit buckets.

    In one process all of it lives in memory. With REDIS_URL it is shared
    through Redis so that every rule holds across processes: presence goes
    offline with a user's last tab anywhere, and a killed process's users go
    offline within PRESENCE_TTL_MS + PRESENCE_HEARTBEAT_S. While Redis is
    unreachable each process answers from what it knows itself, and it puts
    its share back when Redis returns."""

    def __init__(self) -> None:
        self.local: Counter[str] = Counter()       # user id -> live connections here
        self.redis: Any = None
        self.available = False                     # Redis answered the last call
        self.outage_logged = False
        self.errors: tuple[type[Exception], ...] = ()
        self.process = secrets.token_hex(8)
        self.beating: Any = None

    def key(self, name: str) -> str:
        return REDIS_PREFIX + name

    def connect(self, url: str) -> None:
        try:
            import redis  # needed, and imported, only with REDIS_URL
        except ImportError:
            raise ConfigError("REDIS_URL needs the redis package:"
                              " pip install -r requirements-redis.txt") from None

        self.redis = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S,
                                          socket_connect_timeout=REDIS_TIMEOUT_S)
        self.errors = (redis.exceptions.RedisError, OSError)
        self.scripts = {name: self.redis.register_script(source) for name, source in (
            ("join", JOIN_SCRIPT), ("leave", LEAVE_SCRIPT), ("sync", SYNC_SCRIPT),
            ("heartbeat", HEARTBEAT_SCRIPT), ("take", TAKE_TOKEN_SCRIPT))}
        self.beating = sio.start_background_task(self.heartbeat_forever)

    def ask(self, command: Callable[[], Any], alone: Any) -> Any:
        """Redis's answer, or `alone` (what this process knows by itself) when
        there is no Redis or it is away; the heartbeat notices its return."""
        if not self.available:
            return alone
        try:
            return command()
        except self.errors as error:
            self.lost(error)
            return alone

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return self.ask(lambda: self.scripts[script](keys=keys, args=args), None)

    def lost(self, error: Exception) -> None:
        self.available = False
        if not self.outage_logged:
            log.error("Redis is unreachable (%s): serving this process's sockets alone,"
                      " presence and rate limits per process until it returns", error)
            self.outage_logged = True

    def presence_keys(self) -> list[str]:
        return [self.key("online"), self.key("sids"), self.key(f"{self.process}:users"),
                self.key(f"{self.process}:sids")]

    def join(self, sid: str, user_id: str | None) -> bool:
        """Count a new connection; True when it is the user's first anywhere."""
        if user_id is not None:
            self.local[user_id] += 1
        total = self.run("join", self.presence_keys(), [sid, user_id or ""])
        if user_id is None:
            return False
        return total == 1 if total is not None else self.local[user_id] == 1

    def leave(self, sid: str, user_id: str | None) -> bool:
        """Count a closed connection; True when it was the user's last anywhere."""
        if user_id is not None:
            self.local[user_id] -= 1
            if self.local[user_id] <= 0:
                del self.local[user_id]
        total = self.run("leave", self.presence_keys(), [sid, user_id or ""])
        if user_id is None:
            return False
        return total == 0 if total is not None else user_id not in self.local

    def is_online(self, user_id: str) -> bool:
        return bool(self.ask(lambda: self.redis.hexists(self.key("online"), user_id),
                             user_id in self.local))

    def is_socket(self, name: str) -> bool:
        """A socket id of any process: Socket.IO keeps a private room under it."""
        return name in peers or bool(
            self.ask(lambda: self.redis.sismember(self.key("sids"), name), False))

    def users_online(self) -> int:
        return int(self.ask(lambda: self.redis.hlen(self.key("online")), len(self.local)))

    def take_token(self, bucket: str, capacity: int, window_s: float) -> int | None:
        """The shared bucket's answer (0 or ms to wait), or None to use the local one."""
        return self.run("take", [self.key(f"rate:{bucket}")],
                           [capacity, capacity / (window_s * 1000), int(time.time() * 1000),
                            int(window_s * 1000)])

    def heartbeat_forever(self) -> None:
        while True:
            try:
                self.heartbeat()
            except self.errors as error:
                self.lost(error)
            except Exception:
                log.exception("presence heartbeat failed")
            eventlet.sleep(PRESENCE_HEARTBEAT_S)

    def heartbeat(self) -> None:
        """Say this process is alive, retire dead ones, and after an outage put
        this process's connections back."""
        fresh, offline = self.scripts["heartbeat"](
            keys=[self.key("online"), self.key("sids"), self.key("processes")],
            args=[REDIS_PREFIX, self.process, PRESENCE_TTL_MS])
        if fresh or not self.available:
            came, went = self.scripts["sync"](keys=self.presence_keys(), args=[json.dumps(
                {"users": dict(self.local) or {}, "sids": list(peers)})])
            if self.outage_logged:
                log.info("Redis is reachable again: presence and rate limits are shared")
            self.available, self.outage_logged = True, False
            broadcast_presence([u.decode() for u in came], "online")
            broadcast_presence([u.decode() for u in went], "offline")
        broadcast_presence([u.decode() for u in offline], "offline")

    def stop(self) -> None:
        """Leave the cluster at once rather than waiting to be found dead."""
        if self.beating is None:
            return
        self.beating = None
        for sid, peer in list(peers.items()):
            if self.leave(sid, peer.user.id if peer.user else None) and peer.user:
                broadcast_presence([peer.user.id], "offline")
        peers.clear()  # their disconnects, still to come, are already counted


def broadcast_presence(user_ids: list[str], status: str) -> None:
    for user_id in user_ids:
        sio.emit("presence:update", {"userId": user_id, "status": status, "at": now_iso()})


cluster = Cluster()


# =============================================================================
# Event handlers
# =============================================================================

MALFORMED = "(malformed)"
EVENT_PACKETS = (socketio.packet.EVENT, socketio.packet.BINARY_EVENT)
PACKET_TYPES = frozenset("0123456")     # CONNECT ... BINARY_ACK


class NotAPacket(ValueError):
    """Input that is not Socket.IO at all; the connection is closed (Server)."""


class LenientPacket(socketio.packet.Packet):
    """An event packet that cannot be decoded (broken JSON, a number longer
    than Python parses, nesting deeper than its recursion limit, no event name)
    would be dropped with a traceback and the client left waiting. Decoded as
    the event MALFORMED instead, it gets an `Invalid payload` ack like any
    other bad input. So does an event named `connect` or `disconnect`, which
    python-socketio would otherwise pass to the connection handlers, an event
    with binary attachments (the protocol is JSON), and an event with a string
    no field may hold (see unsafe_text).

    What is not a Socket.IO packet at all (an unknown packet type, a binary
    frame that is no attachment, a handshake that is not JSON) raises
    NotAPacket, and the server closes that connection, as socket.io does.

    Since no bytes ever come in, none go out: outgoing packets skip
    python-socketio's recursive search of every payload for bytes, which
    costs more than encoding the payload."""

    uses_binary_events = False

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


PACKET_INT_MAX_DIGITS = 100


def packet_int(digits: str) -> int:
    """An integer read from a packet; a longer one is refused, as engineio does."""
    if len(digits) > PACKET_INT_MAX_DIGITS:
        raise ValueError(f"an integer of over {PACKET_INT_MAX_DIGITS} digits")
    return int(digits)


class PacketJSON:
    """The JSON python-socketio and python-engineio read and write packets
    with: the standard library's, compact, reading integers with packet_int,
    and with one encoder and one decoder made at start (json.dumps and
    json.loads given options build new ones on every call)."""

    encoder = json.JSONEncoder(separators=(",", ":"))
    decoder = json.JSONDecoder(parse_int=packet_int)

    @classmethod
    def dumps(cls, value: Any, **_: Any) -> str:
        return cls.encoder.encode(value)

    @classmethod
    def loads(cls, text: str | bytes, **_: Any) -> Any:
        return cls.decoder.decode(text.decode() if isinstance(text, bytes) else text)


class Server(socketio.Server):
    """python-socketio with three additions (methods of the pinned 5.18.1,
    checked at start by check_libraries):

    - What a handler left to send after its ack (Context.emit) goes out right
      after python-socketio sends the ack, from the same greenlet: the client
      reads its own outcome first, and the ack and the broadcast leave in one
      wake-up of each socket's writer.
    - Input that is not a Socket.IO packet closes that connection with one log
      line; python-socketio would log a traceback and leave it open.
    - A connection that opens Engine.IO but never sends the Socket.IO CONNECT
      packet is closed after CONNECT_TIMEOUT, as socket.io does; it would
      otherwise hold a slot forever, answering pings."""

    def _handle_event_internal(self, server: socketio.Server, sid: str, eio_sid: str,
                               data: list, namespace: str, id: int | None) -> None:
        try:
            super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)
        finally:
            run_all(after_ack.pop(eventlet.getcurrent(), ()))

    def _handle_eio_message(self, eio_sid: str, data: str | bytes) -> None:
        try:
            super()._handle_eio_message(eio_sid, data)
        except ValueError as error:   # NotAPacket, or python-socketio's own refusals
            log.info("closing sid=%s user=%s: not a Socket.IO packet (%s)",
                     self.manager.sid_from_eio_sid(eio_sid, "/") or "-",
                     user_of_eio(eio_sid), error)
            self.eio.disconnect(eio_sid)

    def _handle_eio_connect(self, eio_sid: str, environ: dict) -> None:
        super()._handle_eio_connect(eio_sid, environ)
        eventlet.spawn_after(config.connect_timeout_s, self.close_if_never_connected, eio_sid)

    def close_if_never_connected(self, eio_sid: str) -> None:
        if eio_sid in self.eio.sockets and self.manager.sid_from_eio_sid(eio_sid, "/") is None:
            log.info("closing eio_sid=%s: no Socket.IO CONNECT within %gs",
                     eio_sid, config.connect_timeout_s)
            self.eio.disconnect(eio_sid)


# namespaces="*" lets every namespace reach on_other_namespace, which refuses
# it in the protocol's words (python-socketio's own refusal is a bare string).
sio = Server(async_mode="eventlet", cors_allowed_origins="*", serializer=LenientPacket,
             json=PacketJSON, logger=False, engineio_logger=False, namespaces="*")
after_ack: dict[Any, list[Callable[[], Any]]] = {}   # handler greenlet -> its pending emits


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


peers: dict[str, Peer] = {}


class Metrics:
    """Just enough of the Prometheus text format for /metrics."""

    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency = [0] * (len(ACK_LATENCY_BUCKETS_S) + 1)
        self.latency_sum = 0.0

    def observe(self, event: str, seconds: float, failed: bool) -> None:
        self.events[event] += 1
        self.errors[event] += failed
        self.latency_sum += seconds
        self.latency[bisect.bisect_left(ACK_LATENCY_BUCKETS_S, seconds)] += 1

    def render(self) -> str:
        lines = ["# TYPE shop_connections gauge", f"shop_connections {len(peers)}",
                 "# TYPE shop_users_online gauge", f"shop_users_online {cluster.users_online()}",
                 "# TYPE shop_notifications_queued gauge",
                 f"shop_notifications_queued {notifier.queue.qsize()}",
                 "# TYPE shop_events_total counter"]
        lines += [f'shop_events_total{{event="{e}"}} {n}' for e, n in sorted(self.events.items())]
        lines.append("# TYPE shop_event_errors_total counter")
        lines += [f'shop_event_errors_total{{event="{e}"}} {n}'
                  for e, n in sorted(self.errors.items())]
        lines.append("# TYPE shop_ack_latency_seconds histogram")
        for bound, count in zip((*ACK_LATENCY_BUCKETS_S, "+Inf"), itertools.accumulate(self.latency)):
            lines.append(f'shop_ack_latency_seconds_bucket{{le="{bound}"}} {count}')
        lines += [f"shop_ack_latency_seconds_sum {self.latency_sum:.6f}",
                  f"shop_ack_latency_seconds_count {sum(self.latency)}"]
        return "\n".join(lines) + "\n"


metrics = Metrics()


class Context:
    """What a handler knows of its call. Emits made through it are sent after
    the ack, so a client always learns the outcome of its own request first."""

    def __init__(self, peer: Peer) -> None:
        self.peer, self.sid, self.user = peer, peer.sid, peer.user
        self.after_ack: list[Callable[[], Any]] = []

    def emit(self, event: str, data: dict, **target: Any) -> None:
        self.after_ack.append(functools.partial(sio.emit, event, data, **target))

    def then(self, task: Callable[..., Any], *args: Any) -> None:
        self.after_ack.append(functools.partial(task, *args))


Ack = dict[str, Any]
HANDLED_EVENTS: list[str] = []


def ok(**fields: Any) -> Ack:
    return {"ok": True, **fields}


def event(name: str, user_required: bool = False) -> Callable:
    """Register a handler for a client event; `handle` applies the shared rules."""
    def register(handler: Callable[[Context, Any], Ack]) -> Callable:
        sio.on(name, lambda sid, *args: handle(name, handler, sid, args, user_required))
        HANDLED_EVENTS.append(name)
        return handler
    return register


def handle(name: str, handler: Callable[[Context, Any], Ack], sid: str, args: tuple,
           user_required: bool = False) -> Ack | None:
    """The rules every event shares: the rate limit, one payload argument, the
    user requirement, refusals as error acks, an `Internal error` ack (with the
    traceback logged) for anything unexpected, and the handler's emits sent
    after its ack."""
    peer = peers.get(sid)
    if peer is None:          # the socket left while this was in flight
        return None
    started, context = time.perf_counter(), Context(peer)
    try:
        limiter.check(peer.rate_key, name)
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
            after_ack[eventlet.getcurrent()] = context.after_ack
    metrics.observe(name, time.perf_counter() - started, "error" in ack)
    return ack


def run_all(tasks: Iterable[Callable[[], Any]]) -> None:
    for task in tasks:
        try:
            task()
        except Exception:
            log.exception("emit after ack failed")


def user_of(peer: Peer) -> str:
    return peer.user.id if peer.user else "-"


def user_of_eio(eio_sid: str) -> str:
    """The user behind an Engine.IO session, for log lines below the events."""
    peer = peers.get(sio.manager.sid_from_eio_sid(eio_sid, "/") or "")
    return user_of(peer) if peer else "-"


def in_room(sid: str, room: str) -> bool:
    """Whether a socket is in a room, at once: sio.rooms(sid) would walk every
    room on the server (each socket and user has one) to list this socket's."""
    return sid in sio.manager.rooms.get("/", {}).get(room, ())


def order_rooms(order: dict) -> list[str]:
    """The owner's room and both admin rooms; a socket in several of them
    still receives the event once (python-socketio merges the rooms)."""
    return [f"user:{order['user']}", *ADMIN_ROOMS]


# -- connecting ------------------------------------------------------------------

@sio.event
def connect(sid: str, environ: dict, auth: Any) -> None:
    user, why = authenticate(handshake_token(environ, auth))
    if user is None and config.require_auth:
        log.info("refused sid=%s reason=%s", sid, why)
        raise socketio.exceptions.ConnectionRefusedError("Unauthorized", {"reason": why})
    peer = peers[sid] = Peer(sid, user, why)
    if user:
        store.upsert_user(user)
        sio.enter_room(sid, f"user:{user.id}")
        if user.is_admin:
            for room in ADMIN_ROOMS:
                sio.enter_room(sid, room)
    first_tab = cluster.join(sid, user.id if user else None)
    transport = sio.transport(sid)
    log.info("connect sid=%s user=%s role=%s transport=%s", sid, user_of(peer),
             user.role if user else "anonymous", transport)
    # The client hears of its connection only after this returns, so what it
    # must receive (presence, saved notifications) is sent by a task after it.
    sio.start_background_task(welcome, peer, first_tab)


@sio.on("connect", namespace="*")
def connect_elsewhere(namespace: str, sid: str, environ: dict, auth: Any = None) -> None:
    """The protocol lives in the default namespace alone."""
    raise socketio.exceptions.ConnectionRefusedError("Invalid namespace")


def welcome(peer: Peer, first_tab: bool) -> None:
    if first_tab:
        broadcast_presence([peer.user.id], "online")
    if peer.user:
        notifier.replay(peer.user.id)


@sio.event
def disconnect(sid: str, reason: Any = None) -> None:
    peer = peers.pop(sid, None)
    if peer is None:
        return
    log.info("disconnect sid=%s user=%s reason=%s", sid, user_of(peer), reason)
    last_tab = cluster.leave(sid, peer.user.id if peer.user else None)
    if peer.user is None or peer.user.id not in cluster.local:
        limiter.forget(peer.rate_key)
    if last_tab:
        broadcast_presence([peer.user.id], "offline")


# -- rooms and chat --------------------------------------------------------------

@event("joinRoom")
def join_room(ctx: Context, data: Any) -> Ack:
    room = room_name(data)
    if is_reserved_room(room):
        raise Refusal("Access denied")
    if not in_room(ctx.sid, room):
        sio.enter_room(ctx.sid, room)
        ctx.emit("joined", {"event": "joined", "room": room, "by": ctx.sid,
                            "user": ctx.peer.public()}, to=room, skip_sid=ctx.sid)
    return ok(room=room)


@event("leaveRoom")
def leave_room(ctx: Context, data: Any) -> Ack:
    room = room_name(data)
    if is_reserved_room(room):
        raise Refusal("Access denied")
    if in_room(ctx.sid, room):
        sio.leave_room(ctx.sid, room)
        ctx.emit("left", {"event": "left", "room": room, "by": ctx.sid,
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
    if not in_room(ctx.sid, room):
        raise Refusal("Not in room")
    payload = {"room": room, "text": text, "from": ctx.peer.public(), "ts": now_iso()}
    if meta is not None:
        payload["meta"] = meta
    ctx.emit("message", payload, to=room)
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
    note = store.save_notification(ctx.user, to_user_id, fields)
    if config.notify_queue:
        notifier.queue.put((to_user_id, note))
    else:
        ctx.then(notifier.deliver, to_user_id, note)
    return ok(queued=config.notify_queue, saved=True, id=note["id"])


# -- orders ----------------------------------------------------------------------

@event("order:create", user_required=True)
def order_create(ctx: Context, data: Any) -> Ack:
    order, duplicate = store.create_order(ctx.user, parse_order_request(data))
    if duplicate:
        return ok(order=order, duplicate=True)
    ctx.emit("order:created", {"event": "order:created", "order": order}, to=order_rooms(order))
    return ok(order=order)


@event("order:updateStatus", user_required=True)
def order_update_status(ctx: Context, data: Any) -> Ack:
    data = as_object(data)
    order_id = object_id(data.get("orderId"), "_id")
    order, changed, stock_changes = store.update_order_status(ctx.user, order_id, data.get("status"))
    if changed:
        ctx.emit("order:updated", {"event": "order:updated", "order": order}, to=order_rooms(order))
    for change in stock_changes:
        ctx.emit("product:stockUpdated", {
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
    if not in_room(ctx.sid, room):
        raise Refusal("Not in room")
    ctx.emit("typing", {"event": "typing", "from": ctx.user.id, "room": room, "at": now_iso()},
             to=room, skip_sid=ctx.sid)
    return ok(mode="room")


# -- everything else -------------------------------------------------------------

@event(MALFORMED)
def malformed(ctx: Context, why: Any) -> Ack:
    raise invalid(why)


@sio.on("*")
def unknown_event(name: str, sid: str, *args: Any) -> Ack | None:
    """Without this catch-all python-socketio drops unknown events silently,
    and a client waiting for the ack would only ever see a timeout. They share
    the `*` rate limit and metrics label."""
    def refuse(ctx: Context, data: Any) -> Ack:
        raise Refusal(f"Unknown event: {name}")
    return handle("*", refuse, sid, args[:1])


# =============================================================================
# Notification worker
# =============================================================================

class Notifier:
    """Notifications are saved before they are acked; this greenlet then hands
    them to live connections. Each is claimed in SQLite before it is emitted,
    so the worker and the replay on connect never deliver one twice."""

    STOP = object()

    def __init__(self) -> None:
        self.queue: eventlet.queue.Queue = eventlet.queue.Queue()
        self.worker: Any = None

    def start(self) -> None:
        self.worker = sio.start_background_task(self.run)

    def run(self) -> None:
        while (item := self.queue.get()) is not self.STOP:
            to_user_id, note = item
            try:
                self.deliver(to_user_id, note)
            except Exception:
                log.exception("delivering notification %s failed; it stays saved", note["id"])

    def deliver(self, to_user_id: str, note: dict) -> None:
        """Emit to a live recipient; an offline one gets it on its next connect."""
        if cluster.is_online(to_user_id) and store.mark_delivered(note["id"]):
            sio.emit("notification:received", note, to=f"user:{to_user_id}")

    def replay(self, user_id: str) -> None:
        for note in store.claim_undelivered(user_id):
            sio.emit("notification:received", note, to=f"user:{user_id}")

    def stop(self) -> None:
        """Deliver what is queued, then end the worker."""
        if self.worker is not None:
            self.queue.put(self.STOP)
            self.worker.join()
            self.worker = None


notifier = Notifier()


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


def tester_page(environ: dict, start_response: Callable) -> list[bytes]:
    return respond(start_response, "200 OK", TESTER_FILE.read_bytes(), "text/html; charset=utf-8")


def health(environ: dict, start_response: Callable) -> list[bytes]:
    return json_response(start_response, {"ok": True})


def products(environ: dict, start_response: Callable) -> list[bytes]:
    return json_response(start_response, store.products())


def prometheus(environ: dict, start_response: Callable) -> list[bytes]:
    return respond(start_response, "200 OK", metrics.render(), "text/plain; version=0.0.4")


def server_info(environ: dict, start_response: Callable) -> list[bytes]:
    """What the tester page may offer: dev tokens, the local client script, the Admin UI."""
    return json_response(start_response, {
        "devTokens": not config.jwt_secret,
        "clientScript": CLIENT_SCRIPT_URL if CLIENT_SCRIPT.exists() else None,
        "adminUi": ADMIN_UI_URL if config.admin_ui and ADMIN_UI_DIR.exists() else None,
    })


def client_script(environ: dict, start_response: Callable) -> list[bytes]:
    if not CLIENT_SCRIPT.exists():
        return not_found(start_response)
    return static_file(start_response, CLIENT_SCRIPT)


def admin_ui(environ: dict, start_response: Callable) -> list[bytes]:
    """The Socket.IO Admin UI front-end, behind the ADMIN_UI credentials (HTTP
    Basic); the UI then logs in to the /admin namespace with the same ones."""
    if not config.admin_ui or not ADMIN_UI_DIR.exists():
        return not_found(start_response)
    if not admin_credentials_match(environ.get("HTTP_AUTHORIZATION", "")):
        return respond(start_response, "401 Unauthorized", '{"error": "Unauthorized"}',
                       "application/json", ("WWW-Authenticate", 'Basic realm="Admin UI"'))
    name = environ["PATH_INFO"].removeprefix(ADMIN_UI_URL) or "index.html"
    path = (ADMIN_UI_DIR / name).resolve()
    if not path.is_relative_to(ADMIN_UI_DIR.resolve()) or not path.is_file():
        return not_found(start_response)
    return static_file(start_response, path)


def admin_credentials_match(header: str) -> bool:
    scheme, _, encoded = header.partition(" ")
    try:
        given = base64.b64decode(encoded, validate=True).decode()
    except ValueError:
        return False
    expected = ":".join(config.admin_ui or ("", ""))
    return scheme.lower() == "basic" and secrets.compare_digest(given.encode(), expected.encode())


def dev_token(environ: dict, start_response: Callable) -> list[bytes]:
    """Tokens for the tester page: only while the server runs on its dev
    secret, and only for this server's own pages (see dev_token_refusal)."""
    if config.jwt_secret:
        return not_found(start_response)
    refusal = dev_token_refusal(environ)
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
    return json_response(start_response, {"token": issue_token(jwt_secret, user_id, role,
                                                               name=name)})


def dev_token_refusal(environ: dict) -> str | None:
    """Why a request may not have a dev token, or None. A script on any other
    site could otherwise read one and act as an admin: so a request from a
    page of another origin is refused (and the route sends no CORS header),
    and so is a Host that is neither an IP address, localhost, nor in
    ALLOWED_HOSTS, which is what a DNS-rebinding page sends."""
    host = environ.get("HTTP_HOST", "")
    if not host_allowed(host):
        return (f"Host {shown(host)!r} is not a name of this server (a DNS-rebinding page looks"
                " like this); add it to ALLOWED_HOSTS to allow it")
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None and origin not in (f"http://{host}", f"https://{host}") \
            or environ.get("HTTP_SEC_FETCH_SITE", "same-origin") not in ("same-origin", "none"):
        return (f"dev tokens are for this server's own pages, not for {shown(origin or 'another site')};"
                " open the tester it serves, or use python server.py token USER")
    return None


def host_allowed(host: str) -> bool:
    """A page can only be rebound to this server through a name: IP addresses
    and localhost are safe, other names must be listed in ALLOWED_HOSTS."""
    name = host_name(host)
    if name == "localhost" or name in config.allowed_hosts or "*" in config.allowed_hosts:
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
          "/api/info": server_info, "/metrics": prometheus, "/dev/token": dev_token,
          CLIENT_SCRIPT_URL: client_script}


# Routes that no page of another origin may read: no CORS header, whatever CORS_ORIGINS says.
SAME_ORIGIN_ROUTES = {"/dev/token"}


def http_app(environ: dict, start_response: Callable) -> list[bytes]:
    def start_with_cors(status: str, headers: list) -> Any:
        """The same CORS_ORIGINS as the Socket.IO endpoint."""
        origin = environ.get("HTTP_ORIGIN")
        if path in SAME_ORIGIN_ROUTES:
            pass
        elif config.cors_origins == "*":
            headers.append(("Access-Control-Allow-Origin", "*"))
        elif origin in config.cors_origins:
            headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return start_response(status, headers)

    path = environ.get("PATH_INFO", "/")
    route = admin_ui if path.startswith(ADMIN_UI_URL) else ROUTES.get(path)
    if route is None:
        return not_found(start_with_cors)
    if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
        return json_response(start_with_cors, {"error": "Method not allowed"},
                             "405 Method Not Allowed")
    return route(environ, start_with_cors)


# =============================================================================
# Transports: what reaches python-engineio
# =============================================================================

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

    def __init__(self, ws: Any, eio_sid: str) -> None:
        self.ws, self.eio_sid, self.closed = ws, eio_sid, False
        self.close_websocket = ws.close
        ws.close = self.close          # eventlet's own closes come here too

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ws, name)

    def wait(self) -> str | bytes | None:
        data = self.ws.wait()
        problem = frame_problem(data, config.max_payload_bytes)
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
                     sio.manager.sid_from_eio_sid(self.eio_sid, "/") or self.eio_sid,
                     user_of_eio(self.eio_sid), close_data[1], close_data[0], seen)
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

    def __init__(self, handler: Callable, server: Any) -> None:
        eio_sid = getattr(getattr(handler, "__self__", None), "sid", "-")
        super().__init__(lambda ws: handler(CheckedFrames(ws, eio_sid)), server)


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


def transports(wsgi_app: Callable) -> Callable:
    """What every Socket.IO request goes through first:

    - permessage-deflate is refused: eventlet would compress every frame with
      zlib state per connection, for JSON messages too small to gain from it
      (the benchmark measured fan-out down a third and 2.5x the memory per
      connection). Clients that offer it simply go on uncompressed;
    - eventlet's websocket writes to a log (WebsocketLog), not to stderr;
    - a long-polling POST above MAX_PAYLOAD_BYTES, which python-engineio
      refuses and ends the session for, is logged with its size."""
    errors = WebsocketLog()

    def app(environ: dict, start_response: Callable) -> Any:
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        environ["wsgi.errors"] = errors
        size = environ.get("CONTENT_LENGTH") or "0"
        if size.isdigit() and int(size) > config.max_payload_bytes:
            eio_sid = (parse_qs(environ.get("QUERY_STRING", "")).get("sid") or ["-"])[0]
            log.info("closing sid=%s user=%s: a long-polling POST of %s bytes is above the"
                     " limit of %d", sio.manager.sid_from_eio_sid(eio_sid, "/") or eio_sid,
                     user_of_eio(eio_sid), size, config.max_payload_bytes)
        return wsgi_app(environ, start_response)
    return app


app = transports(socketio.WSGIApp(sio, http_app))


# =============================================================================
# Command line
# =============================================================================

def apply_websocket_mask(data: bytes, mask: bytes, length: int | None = None,
                         offset: int = 0) -> bytes:
    """eventlet unmasks every byte a client sends in a Python loop (~1 ms per
    5 KB, all of it blocking the hub); one big-integer XOR does the same."""
    length = len(data) if length is None else length
    start = offset % 4
    key = (bytes(mask) * (length // 4 + 2))[start:start + length]
    return (int.from_bytes(data[:length], "big") ^ int.from_bytes(key, "big")).to_bytes(
        length, "big")


# What this server extends in the libraries, as of the versions pinned in
# requirements.txt (see Server, CheckedWebSocket and apply_websocket_mask).
LIBRARY_HOOKS = ((socketio.Server, "_handle_event_internal"),
                 (socketio.Server, "_handle_eio_message"),
                 (socketio.Server, "_handle_eio_connect"),
                 (eventlet.websocket.RFC6455WebSocket, "_apply_mask"))


def check_libraries() -> None:
    """Other library versions may lack what this server extends, and it would
    then fail in silence (acks without emits, frames unchecked): refuse to start."""
    missing = [f"{owner.__module__}.{owner.__qualname__}.{name}"
               for owner, name in LIBRARY_HOOKS if not callable(getattr(owner, name, None))]
    if "websocket" not in getattr(sio.eio, "_async", {}):
        missing.append("engineio.Server._async['websocket']")
    if missing:
        raise ConfigError(f"the installed libraries lack {', '.join(missing)};"
                          " install the versions pinned in requirements.txt")


def configure_socketio(cfg: Config) -> None:
    """Apply the settings that python-socketio reads at run time."""
    check_libraries()
    sio.eio.cors_allowed_origins = cfg.cors_origins
    sio.eio.max_http_buffer_size = cfg.max_payload_bytes
    sio.eio._async["websocket"] = CheckedWebSocket
    eventlet.websocket.RFC6455WebSocket._apply_mask = staticmethod(apply_websocket_mask)
    # A long-polling POST may batch many packets; python-engineio drops a batch
    # of more than 16 without a word. The body is bounded by the payload limit,
    # so the packet count needs no bound of its own.
    Payload.max_decode_packets = cfg.max_payload_bytes
    if cfg.redis_url:
        cluster.connect(cfg.redis_url)
        sio.manager = socketio.RedisManager(cfg.redis_url)
        sio.manager.set_server(sio)
    if cfg.admin_ui:
        sio.instrument(auth={"username": cfg.admin_ui[0], "password": cfg.admin_ui[1]})


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


def open_database(cfg: Config, exclusive: bool = False) -> None:
    try:
        store.open(cfg.database, exclusive)
    except (sqlite3.Error, OSError) as error:
        raise ConfigError(f"cannot open database {str(cfg.database)!r}: {error}") from None


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def print_banner(cfg: Config, port: int) -> None:
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
        print(f"  demo user : {issue_token(jwt_secret, 'demo-user', 'user', name='Demo User')}")
        print(f"  demo admin: {issue_token(jwt_secret, 'demo-admin', 'admin', name='Demo Admin')}")
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
    open_database(cfg)
    configure_socketio(cfg)
    limiter.limits = cfg.rate_limits
    listener = listen(cfg)
    print_banner(cfg, listener.getsockname()[1])

    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    notifier.start()
    store.start_checkpoints()
    eventlet.spawn(eventlet.wsgi.server, listener, app, log=logging.getLogger("shop.http"),
                   log_output=cfg.verbose, debug=False, max_size=MAX_CONNECTIONS)
    while not stopping:
        eventlet.sleep(SHUTDOWN_POLL_S)

    log.info("shutting down: no new connections, delivering queued notifications")
    listener.close()
    notifier.stop()
    cluster.stop()
    eventlet.sleep(SHUTDOWN_FLUSH_S)
    store.close()
    log.info("stopped")
    return 0


def reset(cfg: Config) -> int:
    open_database(cfg, exclusive=True)
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
    token = commands.add_parser("token", help="print a Bearer token signed with the server's secret")
    token.add_argument("user_id")
    token.add_argument("--role", choices=("user", "admin"), default="user")
    token.add_argument("--email")
    token.add_argument("--name")
    token.add_argument("--ttl", default=DEFAULT_TOKEN_TTL, help="lifetime, e.g. 30m, 24h, 7d")
    token.add_argument("--db", dest="command_db", help="SQLite file whose dev secret signs it")
    again = commands.add_parser("reset", help="a fresh workshop: no orders, notifications or"
                                " users, the demo catalogue at its seeded stock and prices")
    again.add_argument("--db", dest="command_db", help="SQLite file to reset")
    args = parser.parse_args(argv)
    if getattr(args, "command_db", None):
        args.db = args.command_db
    return args


def main(argv: list[str] | None = None) -> int:
    global config, jwt_secret
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = load_config(args, os.environ)
        if args.command == "reset":
            return reset(config)
        jwt_secret = load_secret(config, create=args.command != "token")
        if args.command == "token":
            token = issue_token(jwt_secret, args.user_id, args.role, args.email, args.name,
                                parse_duration(args.ttl))
            print(token)
            source = "JWT_SECRET" if config.jwt_secret else (
                f"the dev secret {secret_file(config.database).resolve()}, which a server"
                f" started with --db {config.database} uses")
            print(f"signed with {source}", file=sys.stderr)
            return 0
        return serve(config)
    except ConfigError as error:
        print(f"server.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
