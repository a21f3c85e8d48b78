"""What adapts python-socketio, python-engineio and eventlet to Shop Realtime.

server.py speaks only the libraries' public API. Everything here reaches into
their insides — a private method overridden, a class attribute replaced, a
table copied — for one of two reasons, stated at each place:

- correctness: input that is not Engine.IO or Socket.IO (frames, packets,
  long-polling bodies, a connection that never sends CONNECT) gets one log
  line and a closed connection, where the libraries would log a traceback,
  answer an HTTP 500 inside a websocket, or keep the session open;
- speed, measured with `python bench/run.py --against REV` or in instructions
  under callgrind (README "Performance"): each speed-up says what it earns.

It was written and tested against the versions in TESTED_WITH (pinned in
requirements.txt); `check_versions` compares them with what is installed, and
server.py refuses another version unless told to run anyway. A move off
eventlet would replace this module and the public eventlet calls of server.py
(README "About eventlet" lists them).

This module stands below server.py: it imports nothing from it. What it needs
to know of the protocol (how to tell a bad argument, who is behind a socket)
it is given when the server is built.
"""

import base64
import functools
import importlib.metadata
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from urllib.parse import parse_qs

with warnings.catch_warnings():
    # eventlet says on import that it is in maintenance mode; README.md says so once.
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
    import eventlet
    import eventlet.hubs
    import eventlet.queue
    import eventlet.websocket

import engineio
import socketio
from engineio.async_drivers import eventlet as engineio_eventlet
from engineio.payload import Payload

log = logging.getLogger("shop")

# The versions every private name below was read in, and tested against.
TESTED_WITH = {"python-socketio": "5.18.1", "python-engineio": "4.15.1", "eventlet": "0.41.3"}

MALFORMED = "(malformed)"     # the event a packet that cannot be decoded becomes
CLOSE_PROTOCOL_ERROR = 1002   # websocket close codes
CLOSE_TOO_BIG = 1009
PACKET_INT_MAX_DIGITS = 100
SHOWN_MAX = 100

EVENT_PACKETS = (socketio.packet.EVENT, socketio.packet.BINARY_EVENT)
PACKET_TYPES = frozenset("0123456")              # Socket.IO: CONNECT ... BINARY_ACK
ENGINEIO_CLIENT_PACKETS = frozenset("123456b")   # close ping pong message upgrade noop, b: base64


class MessageHandling(Protocol):
    """What StrictServer tells of each Socket.IO packet it hands to python-socketio."""

    def message_started(self) -> None: ...
    def message_handled(self) -> None: ...


# =============================================================================
# Versions
# =============================================================================

def check_versions() -> list[str]:
    """The installed libraries that differ from TESTED_WITH, as
    'python-socketio 5.19.0 (tested: 5.18.1)'; empty when all match. A
    version is what changes behind a private name: a method may keep its
    name and change what it does, so asking hasattr would not notice."""
    differ = []
    for name, tested in TESTED_WITH.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "none"
        if installed != tested:
            differ.append(f"{name} {installed} (tested: {tested})")
    return differ


def install_speedups(max_payload_bytes: int) -> None:
    """What is set process-wide on the libraries, once, when the server starts."""
    # eventlet unmasks every byte a client sends in a Python loop (~1 ms per
    # 5 KB, all of it blocking the hub); one big-integer XOR does the same.
    # Orders 1.08x (every client frame is masked).
    eventlet.websocket.RFC6455WebSocket._apply_mask = staticmethod(apply_websocket_mask)
    # A long-polling POST may batch many packets; python-engineio drops a batch
    # of more than 16 without a word. The body is bounded by the payload
    # limit, so the packet count needs no bound of its own. (Correctness.)
    Payload.max_decode_packets = max_payload_bytes


def apply_websocket_mask(data: bytes, mask: bytes, length: int | None = None,
                         offset: int = 0) -> bytes:
    length = len(data) if length is None else length
    start = offset % 4
    key = (bytes(mask) * (length // 4 + 2))[start:start + length]
    return (int.from_bytes(data[:length], "big") ^ int.from_bytes(key, "big")).to_bytes(
        length, "big")


# =============================================================================
# Packets
# =============================================================================

def packet_int(digits: str) -> int:
    """An integer read from a packet; a longer one is refused, as engineio does."""
    if len(digits) > PACKET_INT_MAX_DIGITS:
        raise ValueError(f"an integer of over {PACKET_INT_MAX_DIGITS} digits")
    return int(digits)


class PacketJSON:
    """The JSON both libraries read and write packets with (their public
    `json=` option): compact, integers of at most 100 digits (the standard
    library alone stops at 4,300), one encoder and one decoder made once
    (json.dumps and json.loads given options build new ones on every call)."""

    encoder = json.JSONEncoder(separators=(",", ":"))
    decoder = json.JSONDecoder(parse_int=packet_int)

    @classmethod
    def dumps(cls, value: Any, **_: Any) -> str:
        if type(value) is list and len(value) == 2 and type(value[1]) is Encoded:
            return f"[{cls.encoder.encode(value[0])},{value[1].json}]"     # an event
        return cls.encoder.encode(value)

    @classmethod
    def loads(cls, text: str | bytes, **_: Any) -> Any:
        return cls.decoder.decode(text.decode() if isinstance(text, bytes) else text)


class Encoded(dict):
    """An event's payload that comes with its JSON text (compact, plain
    JSON): PacketJSON writes the text instead of encoding the payload again.
    python-socketio puts an event's name and payload in a list and encodes it
    with PacketJSON once for all recipients; everything else (the Admin UI,
    Redis) sees a dict."""

    __slots__ = ("json",)

    def __init__(self, payload: dict, text: str) -> None:
        super().__init__(payload)
        self.json = text


class NotAPacket(ValueError):
    """Input that is not Socket.IO at all; the connection is closed."""


def shown(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX] + "…"


class LenientPacket(socketio.packet.Packet):
    """An event packet that cannot be decoded (broken JSON, a number longer
    than allowed, nesting deeper than Python's recursion limit, no event name)
    would be dropped with a traceback and the client left waiting. Decoded as
    the event MALFORMED instead, it gets an `Invalid payload` ack like any other
    bad input. So does an event named `connect` or `disconnect` (python-socketio
    would pass it to the connection handlers), an event with binary
    attachments (the protocol is JSON), and one whose arguments `argument_problem`
    refuses. What is not a Socket.IO packet at all raises NotAPacket.

    Speed: since no bytes ever come in, none go out, so outgoing packets skip
    python-socketio's recursive search of every payload for bytes
    (`uses_binary_events = False`): orders 1.10x, acks 1.05x."""

    uses_binary_events = False
    argument_problem: Callable[[str, Any], str | None] = staticmethod(lambda text, args: None)

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
        else:
            why = self.argument_problem(encoded_packet, self.data)
            if why:
                self.data = [MALFORMED, why]
        return attachments

    def add_attachment(self, attachment: Any) -> bool:
        if not isinstance(attachment, bytes):   # socket.io closes on this too
            raise NotAPacket("text where a binary attachment was announced")
        return super().add_attachment(attachment)


# =============================================================================
# The Socket.IO server
# =============================================================================

class StrictServer(socketio.Server):
    """python-socketio's Server, closing what is not Socket.IO:

    - input that is not a Socket.IO packet closes that connection with one log
      line; python-socketio would log a traceback and leave it open;
    - a connection that opens Engine.IO but never sends the Socket.IO CONNECT
      packet is closed after `connect_timeout_s`, as socket.io does (it would
      otherwise hold a slot forever, answering pings);
    - its Engine.IO server reads websockets through CheckedFrames.

    `argument_problem(raw packet, decoded data)` says why an event's
    arguments cannot be taken (or None); `who(sid)` names the user behind a
    socket in log lines; `around_message` is told when a message's handling
    starts and ends (see _handle_eio_message)."""

    def __init__(self, *, connect_timeout_s: float, max_payload_bytes: int,
                 argument_problem: Callable[[str, Any], str | None],
                 who: Callable[[str], str], around_message: MessageHandling,
                 **options: Any) -> None:
        self.connect_timeout_s, self.max_payload_bytes = connect_timeout_s, max_payload_bytes
        self.who_is, self.around_message = who, around_message
        serializer = type("Packet", (LenientPacket,),
                          {"argument_problem": staticmethod(argument_problem)})
        super().__init__(serializer=serializer, json=PacketJSON,
                         max_http_buffer_size=max_payload_bytes, **options)

    def _engineio_server_class(self) -> Callable[..., engineio.Server]:
        return functools.partial(CheckedEngineServer, self)

    def _handle_eio_message(self, eio_sid: str, data: str | bytes | None) -> None:
        """One Socket.IO packet, handled in this connection's greenlet (the
        server runs with async_handlers=False). When python-socketio returns
        here, a handler's ack (or CONNECT's answer) is queued on its socket:
        what the handler queued for delivery can go right after it, from this
        greenlet. Woken in a greenlet of its own instead, the delivery costs a
        turn of the hub per event (fan-out 10: ~100,000 more instructions a
        message, 6 %; README "Performance")."""
        if not data:            # "4" alone: python-socketio would take it for an event
            self.close_session(eio_sid, "an empty Engine.IO message")
            return
        self.around_message.message_started()
        try:
            super()._handle_eio_message(eio_sid, data)
        except ValueError as error:   # NotAPacket, or python-socketio's own refusals
            self.close_session(eio_sid, f"not a Socket.IO packet ({error})")
        finally:
            self.around_message.message_handled()

    def _handle_eio_connect(self, eio_sid: str, environ: dict) -> None:
        super()._handle_eio_connect(eio_sid, environ)
        # A bare timer of the hub, not a greenlet per connection: its callback
        # never waits (close_session starts a task for that).
        eventlet.hubs.get_hub().schedule_call_global(
            self.connect_timeout_s, self.close_if_never_connected, eio_sid)

    def close_if_never_connected(self, eio_sid: str) -> None:
        """Any namespace counts: the Admin UI connects to /admin alone."""
        if eio_sid in self.eio.sockets and not any(
                self.manager.sid_from_eio_sid(eio_sid, namespace)
                for namespace in self.manager.get_namespaces()):
            self.close_session(eio_sid, f"no Socket.IO CONNECT within {self.connect_timeout_s:g}s")

    def close_session(self, eio_sid: str, why: str) -> None:
        """End an Engine.IO session, with one log line. Not with
        eio.disconnect, which waits until the client has read the close
        packet: over long-polling it never does, and the request that is
        closing the session would hang."""
        log.info("closing sid=%s user=%s: %s", *self.who(eio_sid), why)
        session = self.eio.sockets.get(eio_sid)
        if session is not None:
            session.close(wait=False, reason=self.eio.reason.SERVER_DISCONNECT)

    def who(self, eio_sid: str) -> tuple[str, str]:
        """(socket id, user) behind an Engine.IO session, for log lines."""
        sid = self.manager.sid_from_eio_sid(eio_sid, "/") or eio_sid
        return sid, self.who_is(sid)

    def has_session(self, eio_sid: str) -> bool:
        return eio_sid in self.eio.sockets


class CheckedEngineServer(engineio.Server):
    """python-engineio's Server with CheckedWebSocket as its websocket and
    SendQueue as its sockets' queue; the table of its async driver is copied,
    not changed, for this server alone."""

    def __init__(self, sio: StrictServer, **options: Any) -> None:
        super().__init__(**options)
        self.sio = sio
        self._async = {**self._async, "websocket": CheckedWebSocket, "queue": SendQueue}


class SendQueue(eventlet.queue.Queue):
    """The queue of packets waiting to go out on one Engine.IO socket.

    Its writer (python-engineio's Socket.poll) takes what is waiting as a
    batch: one wait with a timeout (ping interval + ping timeout), then gets
    without waiting until Empty. Two things are done differently here:

    - eventlet arms a hub timer for each timed wait and cancels it when a
      packet comes: ~10,000 instructions per packet sent, 6.5 % of a chat
      message to 10 (callgrind). Here one timer serves the waits that follow
      one another: when it fires it looks at the wait in progress and throws
      Empty into it, or arms again for what is left of that wait's timeout. A
      closed socket's queue is kept by its timer until that fires (45 s at most).
    - python-engineio writes each packet of a batch with a sendall of its own.
      The queue remembers who took the batch and how much of it is left, so
      CheckedFrames can hold a frame while more of the batch follows and send
      them with one sendall: an ack and the event behind it (an order's) leave
      in one TCP segment: 1.04 sendto calls an order under strace, not 2.16
      (~12 µs of server CPU each on loopback)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: Any = None          # the greenlet in a timed wait, if any
        self.deadline = 0.0               # when that wait ends
        self.timer: Any = None
        self.due = 0.0                    # when the timer fires
        self.batch = 0                    # packets taken since the last wait
        self.sender: Any = None           # the greenlet that took a whole batch

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:                         # a batch begins
            self.sender = None
            item = self.wait_for_packet(timeout)
            self.batch = 1
            return item
        try:
            item = super().get(block=False)
        except eventlet.queue.Empty:      # the batch is complete: its writer sends it now
            self.sender = eventlet.getcurrent()
            raise
        self.batch += 1
        return item

    def more_to_send(self) -> bool:
        """Asked before each packet is written: whether the greenlet writing
        it has more of its batch to write right after, without a yield (so
        the packet may wait for them)."""
        if self.sender is not eventlet.getcurrent():
            return False
        self.batch -= 1
        if self.batch > 0:
            return True
        self.sender = None
        return False

    def wait_for_packet(self, timeout: float | None) -> Any:
        if timeout is None or self.qsize() or self.getters:
            return super().get(True, timeout)    # (two waiters: each its own timer)
        hub = eventlet.hubs.get_hub()
        self.deadline = hub.clock() + timeout
        if self.timer is None:
            self.due = self.deadline
            self.timer = hub.schedule_call_global(timeout, self.expire)
        elif self.deadline < self.due:           # a shorter timeout than the armed one
            return super().get(True, timeout)
        self.waiting = eventlet.getcurrent()
        try:
            return super().get()
        finally:
            self.waiting = None

    def expire(self) -> None:
        hub = eventlet.hubs.get_hub()
        self.timer = None
        if self.waiting is None:
            return
        left = self.deadline - hub.clock()
        if left > 0:
            self.due = self.deadline
            self.timer = hub.schedule_call_global(left, self.expire)
        else:
            self.waiting.throw(eventlet.queue.Empty())


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
    does a message above the payload limit, and every close eventlet makes
    for its own reasons (a frame above the limit: 1009). Closing twice is a
    no-op, so no "socket shutdown error" follows.

    It is also the websocket python-engineio writes to: a frame is held while
    the socket's SendQueue says its writer has more of the batch to write, and
    the batch goes out with one sendall (eventlet's send, minus one syscall
    per frame held)."""

    def __init__(self, sio: StrictServer, ws: Any, eio_sid: str, queue: Any = None) -> None:
        self.sio, self.ws, self.eio_sid, self.closed = sio, ws, eio_sid, False
        self.close_websocket = ws.close
        ws.close = self.close          # eventlet's own closes come here too
        batches = isinstance(queue, SendQueue) and \
            isinstance(ws, eventlet.websocket.RFC6455WebSocket)
        self.queue: SendQueue | None = queue if batches else None
        if self.queue is not None:
            # A long-polling GET on this keep-alive connection may have taken
            # the last batch; this greenlet's probe answer must not wait for it.
            self.queue.sender = None
        self.held: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ws, name)

    def send(self, message: str | bytes) -> None:
        if self.queue is None:
            return self.ws.send(message)
        frame = self.ws._pack_message(message)         # (deflated, if agreed)
        if self.queue.more_to_send():                  # no yield until the batch's last
            self.held.append(frame)
            return
        if self.held:
            frame = b"".join((*self.held, frame))
            self.held.clear()
        self.ws._send(frame)                           # eventlet's sendall under its lock

    def wait(self) -> str | bytes | None:
        data = self.ws.wait()
        problem = frame_problem(data, self.sio.max_payload_bytes)
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
                     *self.sio.who(self.eio_sid), close_data[1], close_data[0], seen)
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

    def __init__(self, handler: Callable, server: CheckedEngineServer) -> None:
        socket = getattr(handler, "__self__", None)      # the Engine.IO socket upgrading
        eio_sid, queue = getattr(socket, "sid", "-"), getattr(socket, "queue", None)
        super().__init__(
            lambda ws: handler(CheckedFrames(server.sio, ws, eio_sid, queue)), server)


# =============================================================================
# Transports: what every Socket.IO request goes through first
# =============================================================================

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


def transport_middleware(sio: StrictServer, wsgi_app: Callable) -> Callable:
    """A WSGI middleware in front of the Socket.IO endpoint:

    - permessage-deflate is refused: eventlet would compress every frame with
      zlib state per connection, for JSON messages too small to gain from it
      (the benchmark measured fan-out down a third and 2.5x the memory per
      connection). Clients that offer it simply go on uncompressed;
    - eventlet's websocket writes to a log (WebsocketLog), not to stderr;
    - a long-polling POST above the payload limit, which python-engineio
      refuses and ends the session for, is logged with its size;
    - a long-polling POST whose body is not Engine.IO packets (the checks of
      CheckedFrames) ends its session with one log line and a 400; in
      python-engineio it would raise, with a traceback, and leave it open."""
    errors = WebsocketLog()
    limit = sio.max_payload_bytes

    def app(environ: dict, start_response: Callable) -> Any:
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        environ["wsgi.errors"] = errors
        size = environ.get("CONTENT_LENGTH") or "0"
        if environ.get("REQUEST_METHOD") != "POST" or not size.isdigit() or size == "0":
            return wsgi_app(environ, start_response)
        eio_sid = (parse_qs(environ.get("QUERY_STRING", "")).get("sid") or ["-"])[0]
        if int(size) > limit:
            log.info("closing sid=%s user=%s: a long-polling POST of %s bytes is above the"
                     " limit of %d", *sio.who(eio_sid), size, limit)
            return wsgi_app(environ, start_response)
        body = environ["wsgi.input"].read(int(size))
        environ["wsgi.input"] = io.BytesIO(body)
        problem = payload_problem(body, limit)
        if problem is None or not sio.has_session(eio_sid):
            return wsgi_app(environ, start_response)
        sio.close_session(eio_sid, f"{problem} in a long-polling POST")
        data = json.dumps({"error": problem}).encode()
        start_response("400 Bad Request", [("Content-Type", "application/json"),
                                           ("Content-Length", str(len(data)))])
        return [data]
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
