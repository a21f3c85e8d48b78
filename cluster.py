"""Several server.py processes through Redis: presence, socket ids and rate
limits shared, so that every rule of the protocol holds across processes.

Imported by server.py only when REDIS_URL is set; python-socketio's
RedisManager carries the rooms and emits. A single process keeps the same
things in memory instead (server.LocalPresence; both fill server.Presence).
"""

import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger("shop")

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
for _, sid in ipairs(state.sids) do
  redis.call('SADD', KEYS[2], sid); redis.call('SADD', KEYS[4], sid)
end
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
    """Who is online, which socket ids exist, and the rate-limit buckets,
    shared through Redis: presence goes offline with a user's last tab
    anywhere, and a killed process's users go offline within
    PRESENCE_TTL_MS + PRESENCE_HEARTBEAT_S. While Redis is unreachable each
    process answers from what it knows itself, and it puts its share back
    when Redis returns."""

    def __init__(self, url: str, peers: dict[str, Any]) -> None:
        self.peers = peers                         # this process's sockets (server.Connection)
        self.local: Counter[str] = Counter()       # user id -> live connections here
        self.available = False                     # Redis answered the last call
        self.outage_logged = False
        self.process = secrets.token_hex(8)
        self.beating: Any = None
        self.announce: Callable[[list[str], str], None] = lambda users, status: None
        self.redis = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S,
                                          socket_connect_timeout=REDIS_TIMEOUT_S)
        self.errors = (redis.exceptions.RedisError, OSError)
        self.scripts = {name: self.redis.register_script(source) for name, source in (
            ("join", JOIN_SCRIPT), ("leave", LEAVE_SCRIPT), ("sync", SYNC_SCRIPT),
            ("heartbeat", HEARTBEAT_SCRIPT), ("take", TAKE_TOKEN_SCRIPT))}

    def start(self, spawn: Callable, announce: Callable[[list[str], str], None]) -> None:
        """Beat in a background task; `announce` broadcasts presence changes."""
        self.announce = announce
        self.beating = spawn(self.heartbeat_forever)

    def key(self, name: str) -> str:
        return REDIS_PREFIX + name

    def ask(self, command: Callable[[], Any], alone: Any) -> Any:
        """Redis's answer, or `alone` (what this process knows by itself) when
        Redis is away; the heartbeat notices its return."""
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

    def is_socket(self, name: str) -> bool:
        """A socket id of any process: Socket.IO keeps a private room under it."""
        return name in self.peers or bool(
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
            time.sleep(PRESENCE_HEARTBEAT_S)   # green under eventlet

    def heartbeat(self) -> None:
        """Say this process is alive, retire dead ones, and after an outage put
        this process's connections back."""
        fresh, offline = self.scripts["heartbeat"](
            keys=[self.key("online"), self.key("sids"), self.key("processes")],
            args=[REDIS_PREFIX, self.process, PRESENCE_TTL_MS])
        if fresh or not self.available:
            came, went = self.scripts["sync"](keys=self.presence_keys(), args=[json.dumps(
                {"users": dict(self.local) or {}, "sids": list(self.peers)})])
            if self.outage_logged:
                log.info("Redis is reachable again: presence and rate limits are shared")
            self.available, self.outage_logged = True, False
            self.announce([u.decode() for u in came], "online")
            self.announce([u.decode() for u in went], "offline")
        self.announce([u.decode() for u in offline], "offline")

    def stop(self) -> None:
        """Leave the cluster at once rather than waiting to be found dead."""
        if self.beating is None:
            return
        self.beating = None
        for sid, peer in list(self.peers.items()):
            if self.leave(sid, peer.user.id if peer.user else None) and peer.user:
                self.announce([peer.user.id], "offline")
        self.peers.clear()  # their disconnects, still to come, are already counted
