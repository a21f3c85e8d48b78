"""The ceiling: a bare python-socketio server on eventlet with trivial handlers
for the events the benchmark sends (constant acks, a plain room broadcast, no
database, no auth). server.py is measured against it.

It takes server.py's command line (--host, --port, --db) and prints the same
"listening on" line, so the benchmark starts both the same way.
"""

import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
import eventlet

eventlet.monkey_patch()

import argparse
import socket

import eventlet.wsgi
import socketio

ORDER = {"_id": "0" * 24, "user": "u", "items": [{"product": "0" * 24, "quantity": 1,
                                                  "price": 25}],
         "shippingAddress": None, "paymentMethod": None, "total": 25, "status": "pending",
         "createdAt": "2026-01-01T00:00:00.000Z", "updatedAt": "2026-01-01T00:00:00.000Z"}

sio = socketio.Server(async_mode="eventlet", cors_allowed_origins="*")


@sio.event
def connect(sid, environ, auth):
    return True


@sio.on("whoami")
def whoami(sid, data=None):
    return {"userId": "u", "role": "user", "email": None, "isVerified": False}


@sio.on("joinRoom")
def join_room(sid, room):
    sio.enter_room(sid, room)
    return {"ok": True, "room": room}


@sio.on("message")
def message(sid, data):
    sio.emit("message", {"room": data["room"], "text": data["text"], "from": None,
                         "ts": "2026-01-01T00:00:00.000Z", "meta": data.get("meta")},
             to=data["room"])
    return {"ok": True, "sentTo": "room:" + data["room"]}


@sio.on("order:create")
def order_create(sid, data):
    return {"ok": True, "order": ORDER}


@sio.on("order:updateStatus")
def order_update_status(sid, data):
    return {"ok": True, "order": {**ORDER, "status": "paid"}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db")
    args = parser.parse_args()
    listener = eventlet.listen((args.host, args.port), backlog=1024)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    host, port = listener.getsockname()[:2]
    print(f"Ceiling listening on http://{host}:{port}", flush=True)
    eventlet.wsgi.server(listener, socketio.WSGIApp(sio), log_output=False, debug=False,
                         max_size=100_000)


if __name__ == "__main__":
    main()
