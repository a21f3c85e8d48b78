-- Shop Realtime storage. Applied on every start: every statement is idempotent.
-- Money is stored in integer cents; ids of orders and notifications are
-- 24-hex ObjectId-style strings, as the original Mongo backend returned them.

CREATE TABLE IF NOT EXISTS users (
    id          TEXT PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    role        TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    email       TEXT,
    name        TEXT,
    is_verified INTEGER NOT NULL DEFAULT 0 CHECK (is_verified IN (0, 1)),
    created_at  TEXT NOT NULL,
    seen_at     TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS products (
    id          TEXT PRIMARY KEY CHECK (length(id) = 24 AND id NOT GLOB '*[^0-9a-f]*'),
    name        TEXT NOT NULL CHECK (length(name) > 0),
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    stock       INTEGER NOT NULL CHECK (stock >= 0)
);

CREATE TABLE IF NOT EXISTS orders (
    id               TEXT PRIMARY KEY CHECK (length(id) = 24 AND id NOT GLOB '*[^0-9a-f]*'),
    user_id          TEXT NOT NULL REFERENCES users (id),
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'paid', 'shipped', 'completed', 'cancelled')),
    total_cents      INTEGER NOT NULL CHECK (total_cents >= 0),
    shipping_address TEXT CHECK (shipping_address IS NULL OR json_valid(shipping_address)),
    payment_method   TEXT,
    idempotency_key  TEXT CHECK (idempotency_key IS NULL OR length(idempotency_key) BETWEEN 1 AND 64),
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
-- A retried order:create finds its original order through this index.
CREATE UNIQUE INDEX IF NOT EXISTS orders_by_idempotency_key
    ON orders (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
DROP INDEX IF EXISTS orders_by_user;            -- no lookup uses it: one less write per order

CREATE TABLE IF NOT EXISTS order_items (
    order_id    TEXT NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    position    INTEGER NOT NULL CHECK (position >= 0),
    product_id  TEXT NOT NULL REFERENCES products (id),
    quantity    INTEGER NOT NULL CHECK (quantity >= 1),
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    PRIMARY KEY (order_id, position)
) WITHOUT ROWID;
DROP INDEX IF EXISTS order_items_by_product;    -- likewise

CREATE TABLE IF NOT EXISTS notifications (
    id           TEXT PRIMARY KEY CHECK (length(id) = 24 AND id NOT GLOB '*[^0-9a-f]*'),
    to_user_id   TEXT NOT NULL CHECK (length(to_user_id) BETWEEN 1 AND 128),
    from_user_id TEXT NOT NULL REFERENCES users (id),
    type         TEXT NOT NULL CHECK (type IN ('info', 'warning', 'error')),
    priority     TEXT NOT NULL CHECK (priority IN ('low', 'normal', 'high')),
    title        TEXT CHECK (title IS NULL OR length(title) <= 200),
    body         TEXT CHECK (body IS NULL OR length(body) <= 2000),
    meta         TEXT CHECK (meta IS NULL OR json_valid(meta)),
    created_at   TEXT NOT NULL,
    delivered_at TEXT
);
-- The replay on connect reads only what is still undelivered, oldest first.
CREATE INDEX IF NOT EXISTS notifications_undelivered
    ON notifications (to_user_id, created_at) WHERE delivered_at IS NULL;

-- The event log: every durable event (order:created, order:updated,
-- product:stockUpdated, notification:received, message), written in the
-- transaction of the change it reports. `seq` grows in commit order (SQLite has
-- one writer at a time, across processes too, and a new row's rowid is the
-- greatest plus one; retention never removes the newest, so it never goes back);
-- an offset is the log's id and seq. user_id is an order's owner or a
-- notification's recipient, room a message's room, subject a notification's id.
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    user_id    TEXT,
    room       TEXT,
    subject    TEXT,
    payload    TEXT NOT NULL,
    created_at REAL NOT NULL
);
-- A notification's event is found by its id. joinRoom's history reads the
-- events after `since` in order, as a catch-up on connect does: an index on
-- room would be one more page written with every chat message.
CREATE INDEX IF NOT EXISTS events_by_subject ON events (subject) WHERE subject IS NOT NULL;
DROP INDEX IF EXISTS events_by_room;

-- Which log this is (a new database or a reset starts another, so an old
-- offset is unknown rather than mistaken for a position), and up to where
-- retention has pruned it.
CREATE TABLE IF NOT EXISTS event_log (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    log_id         TEXT NOT NULL CHECK (length(log_id) = 8),
    pruned_through INTEGER NOT NULL DEFAULT 0
);
INSERT INTO event_log (id, log_id) VALUES (1, lower(hex(randomblob(4))))
ON CONFLICT (id) DO NOTHING;

-- The demo catalogue as seeded: what `python server.py reset` puts back.
CREATE TABLE IF NOT EXISTS demo_catalogue (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    price_cents INTEGER NOT NULL,
    stock       INTEGER NOT NULL
);
INSERT INTO demo_catalogue (id, name, price_cents, stock) VALUES
    ('64a1b2c3d4e5f67890123456', 'Demo T-shirt',      10000,  50),
    ('64a1b2c3d4e5f67890123457', 'Demo Mug',          15000,  20),
    ('64a1b2c3d4e5f67890123458', 'Demo Sticker pack',  2500, 500),
    ('64a1b2c3d4e5f67890123459', 'Limited Poster',     4000,   1)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, price_cents = excluded.price_cents,
                               stock = excluded.stock;

-- The products it seeds. Existing rows are left alone, so stock survives restarts.
INSERT INTO products (id, name, price_cents, stock)
    SELECT id, name, price_cents, stock FROM demo_catalogue WHERE true
ON CONFLICT (id) DO NOTHING;
