"""A live shop for a demo: simulated shoppers through the real protocol.

    pip install "python-socketio[client]"
    python examples/shoppers.py [--url URL] [--shoppers N] [--seconds S]

Each shopper is a python-socketio client with a token of its own (a dev token
from the server, or one line of --tokens FILE when the server has JWT_SECRET:
make them with `python server.py token shopper-1`). They join the room
`lobby`, chat, type, place orders from the catalogue, pay and cancel them,
notify one another, and now and then send a wrong payload to show the error
it gets, at a human pace, one line per action. Open the tester as an admin,
join `lobby`, and watch the shop come alive. Ctrl-C stops it.

Stock never runs out: shoppers order only what is well in stock, and they
cancel paid orders (which puts the stock back) about as often as they pay
when stock gets low, so it can run for an hour.
"""

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import socketio

ROOM = "lobby"
ACK_TIMEOUT_S = 5
KEEP_IN_STOCK = 10          # never order a product below this stock
CHAT = ["Hi all!", "Is the mug dishwasher safe?", "Just ordered a T-shirt 🎉",
        "Stickers are back in stock", "Anyone tried the poster?", "Shipping was fast"]


class Shopper:
    """One simulated customer: a socket, and the orders it has placed."""

    def __init__(self, url: str, name: str, token: str) -> None:
        self.name = name
        self.pending: list[str] = []        # order ids, by status
        self.paid: list[str] = []
        self.client = socketio.Client(reconnection=True)
        self.client.on("notification:received", self.on_notification)
        self.client.connect(url, auth={"token": token}, transports=["websocket"],
                            wait_timeout=ACK_TIMEOUT_S)

    def call(self, event: str, payload) -> dict:
        return self.client.call(event, payload, timeout=ACK_TIMEOUT_S)

    def on_notification(self, note: dict) -> None:
        say(self.name, "← notification", f"from {note['from']}: {note['title']}")

    def close(self) -> None:
        self.client.disconnect()


PRINTING = threading.Lock()   # events come on the clients' threads: one line at a time


def say(who: str, action: str, outcome: str) -> None:
    with PRINTING:
        print(f"{time.strftime('%H:%M:%S')}  {who:<12} {action:<28} {outcome}", flush=True)


def outcome(ack: dict) -> str:
    if "error" in ack:
        return f"✕ {ack['error']}" + (f" ({ack['detail']})" if ack.get("detail") else "")
    return "ok"


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=ACK_TIMEOUT_S) as response:
        return json.load(response)


def tokens_for(url: str, count: int, tokens_file: str | None) -> list[tuple[str, str]]:
    """(name, token) per shopper: dev tokens, else the lines of --tokens."""
    if tokens_file:
        with open(tokens_file, encoding="utf-8") as lines:
            tokens = [line.strip() for line in lines if line.strip()]
        if len(tokens) < count:
            sys.exit(f"shoppers.py: {tokens_file} has {len(tokens)} tokens for {count} shoppers")
        return [(f"shopper-{n + 1}", token) for n, token in enumerate(tokens[:count])]
    shoppers = []
    for n in range(1, count + 1):
        name = f"shopper-{n}"
        query = urllib.parse.urlencode({"user": name, "name": f"Shopper {n}"})
        try:
            shoppers.append((name, get_json(f"{url}/dev/token?{query}")["token"]))
        except urllib.error.HTTPError as error:
            if error.code == 404:
                sys.exit("shoppers.py: the server has JWT_SECRET set, so no dev tokens: make"
                         " them with `python server.py token shopper-1` (one per line) and pass"
                         " --tokens FILE")
            sys.exit(f"shoppers.py: GET /dev/token answered {error.code}")
        except OSError as error:
            sys.exit(f"shoppers.py: cannot reach {url}: {error}")
    return shoppers


# -- what a shopper does ----------------------------------------------------------

def chat(shop: "Shop", shopper: Shopper) -> None:
    text = shop.random.choice(CHAT)
    ack = shopper.call("message", {"room": ROOM, "text": text})
    say(shopper.name, "message", f"{text!r} → {outcome(ack)}")


def type_(shop: "Shop", shopper: Shopper) -> None:
    say(shopper.name, "typing", outcome(shopper.call("typing", {"room": ROOM})))


def order(shop: "Shop", shopper: Shopper) -> None:
    plenty = [p for p in get_json(f"{shop.url}/api/products") if p["stock"] > KEEP_IN_STOCK]
    if not plenty:
        return chat(shop, shopper)
    items = [{"product": p["_id"], "quantity": shop.random.randint(1, 2), "price": p["price"]}
             for p in shop.random.sample(plenty, k=min(len(plenty), shop.random.randint(1, 2)))]
    total = sum(round(i["price"] * 100) * i["quantity"] for i in items) / 100
    ack = shopper.call("order:create", {"items": items, "total": total})
    if "order" in ack:
        shopper.pending.append(ack["order"]["_id"])
        say(shopper.name, "order:create", f"pending order {ack['order']['_id']}, total {total:g}")
    else:
        say(shopper.name, "order:create", outcome(ack))


def pay_or_cancel(shop: "Shop", shopper: Shopper) -> None:
    """Pay a pending order while stock is plentiful; else cancel a paid one,
    which puts its stock back."""
    low = any(p["stock"] <= KEEP_IN_STOCK for p in get_json(f"{shop.url}/api/products")
              if p["stock"] > 1)
    if shopper.paid and (low or shop.random.random() < 0.3):
        order_id, status = shopper.paid.pop(0), "cancelled"
    elif shopper.pending:
        order_id = shopper.pending.pop(0)
        status = "cancelled" if low else "paid"
    else:
        return order(shop, shopper)
    ack = shopper.call("order:updateStatus", {"orderId": order_id, "status": status})
    if status == "paid" and "order" in ack:
        shopper.paid.append(order_id)
    say(shopper.name, f"order:updateStatus {status}", f"{order_id} → {outcome(ack)}")


def notify(shop: "Shop", shopper: Shopper) -> None:
    others = [s for s in shop.shoppers if s is not shopper]
    if not others:
        return chat(shop, shopper)
    to = shop.random.choice(others)
    ack = shopper.call("notification:send", {"toUserId": to.name, "title": "Psst",
                                             "body": "Have you seen the sticker pack?"})
    say(shopper.name, "notification:send", f"to {to.name} → {outcome(ack)}")


def make_a_mistake(shop: "Shop", shopper: Shopper) -> None:
    """The errors a workshop learns from: each answered in the protocol's words."""
    event, payload, what = shop.random.choice([
        ("order:create", {"items": [{"product": "64a1b2c3d4e5f67890123456", "quantity": 1,
                                     "price": 100}], "total": 99}, "a wrong total"),
        ("order:create", {"items": [{"product": "not-an-id", "quantity": 1, "price": 1}],
                          "total": 1}, "a bad product id"),
        ("message", {"room": "kitchen", "text": "anyone here?"}, "a room it is not in"),
        ("joinRoom", "admin", "a reserved room"),
    ])
    say(shopper.name, f"{event} ({what})", outcome(shopper.call(event, payload)))


ACTIONS = [(chat, 4), (type_, 2), (order, 3), (pay_or_cancel, 3), (notify, 1),
           (make_a_mistake, 1)]


class Shop:
    def __init__(self, url: str, shoppers: list[Shopper], seed: int | None) -> None:
        self.url, self.shoppers, self.random = url, shoppers, random.Random(seed)

    def step(self) -> None:
        shopper = self.random.choice(self.shoppers)
        action = self.random.choices([a for a, _ in ACTIONS], [w for _, w in ACTIONS])[0]
        action(self, shopper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoppers.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    parser.add_argument("--shoppers", type=int, default=5, help="how many (default 5)")
    parser.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    parser.add_argument("--rate", type=float, default=2.0,
                        help="actions per second, all shoppers together (default 2)")
    parser.add_argument("--tokens", help="a file of Bearer tokens, one per line (JWT_SECRET)")
    parser.add_argument("--seed", type=int, help="make the run repeatable")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")

    shoppers: list[Shopper] = []
    try:
        for name, token in tokens_for(url, args.shoppers, args.tokens):
            shoppers.append(Shopper(url, name, token))
            say(name, "joinRoom", outcome(shoppers[-1].call("joinRoom", ROOM)))
        shop = Shop(url, shoppers, args.seed)
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        while deadline is None or time.monotonic() < deadline:
            shop.step()
            time.sleep(shop.random.uniform(0.5, 1.5) / args.rate)
    except KeyboardInterrupt:
        print("\nstopping: the shoppers leave", flush=True)
    except socketio.exceptions.ConnectionError as error:
        print(f"shoppers.py: cannot connect to {url}: {error}", file=sys.stderr)
        return 1
    finally:
        for shopper in shoppers:
            shopper.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
