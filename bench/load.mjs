// The benchmark's load generator: official socket.io-client 4 on Node.js.
// node bench/load.mjs '<json>' runs one scenario and prints one JSON line of results.
// Config: { url, scenario, secret, clients, seconds, members, deflate, transport, idle,
//           events, creators }
import { createHmac } from "node:crypto";
import { performance } from "node:perf_hooks";
import { io } from "socket.io-client";

const cfg = JSON.parse(process.argv[2]);
const STICKERS = "64a1b2c3d4e5f67890123458";
const ORDER = { items: [{ product: STICKERS, quantity: 1, price: 25 }], total: 25 };

function token(userId, claims = {}) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub: userId, exp: Math.floor(Date.now() / 1000) + 3600, ...claims })}`;
  return `Bearer ${body}.${createHmac("sha256", cfg.secret).update(body).digest("base64url")}`;
}

let failures = 0;

function connectTo(auth) {
  return io(cfg.url, {
    transports: cfg.transport === "polling" ? ["polling"] : ["websocket"],
    auth,
    reconnection: false,
    forceNew: true,
    timeout: 20000,
    perMessageDeflate: cfg.deflate ? { threshold: 1024 } : false,
  });
}

function open(userId, claims = {}) {
  return new Promise((resolve, reject) => {
    const socket = connectTo({ token: token(userId, claims) });
    socket.onAny(() => { lastEvent = performance.now(); });
    socket.once("connect", () => resolve(socket));
    socket.once("connect_error", (error) => { failures++; reject(error); });
  });
}

let lastEvent = performance.now();

// Every new user's presence goes to every connected client: a storm of
// connections is followed by a storm of presence:update. Let it pass.
async function quiet(ms = 500, limit = 120000) {
  const until = performance.now() + limit;
  while (performance.now() - lastEvent < ms && performance.now() < until) {
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function openMany(count, prefix, parallel = 100, users = count, claims = {}) {
  const sockets = [];
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const n = next++;
      sockets[n] = await open(`${prefix}-${n % users}`, claims);
    }
  };
  await Promise.all(Array.from({ length: Math.min(parallel, count) }, worker));
  return sockets;
}

function call(socket, event, payload, timeoutMs = 10000) {
  return socket.timeout(timeoutMs).emitWithAck(event, payload).catch(() => { failures++; return null; });
}

function percentile(sorted, p) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : null;
}

function summary(count, seconds, latencies, extra = {}) {
  latencies.sort((a, b) => a - b);
  return { count, seconds, rate: count / seconds, p50: percentile(latencies, 0.5),
           p99: percentile(latencies, 0.99), ...extra };
}

// Every client loops `event` as fast as its acks come back.
async function loop(sockets, event, payload, seconds, check = (ack) => ack !== null) {
  const latencies = [];
  let count = 0;
  const until = performance.now() + seconds * 1000;
  await Promise.all(sockets.map(async (socket) => {
    while (performance.now() < until) {
      const started = performance.now();
      const ack = await call(socket, event, payload(socket));
      if (!check(ack)) { failures++; continue; }
      latencies.push(performance.now() - started);
      count++;
    }
  }));
  return { count, latencies };
}

// The timed window. The orchestrator reads the server's CPU time (and memory)
// at "start", answers "go", and reads the CPU time again at "end".
async function measured(run, info = {}) {
  process.stdout.write(JSON.stringify({ phase: "start", ...info }) + "\n");
  await new Promise((resolve) => process.stdin.once("data", resolve));
  const cpu = process.cpuUsage();
  const started = performance.now();
  const result = await run();
  const wall = (performance.now() - started) / 1000;
  const used = process.cpuUsage(cpu);
  process.stdout.write(JSON.stringify({ phase: "end" }) + "\n");
  return { ...result, generatorCpu: (used.user + used.system) / 1e6 / wall, wall };
}

// Clients looping one event, each sending the next as soon as its ack is back.
async function looped(prefix, event, payload, ok, warmUp) {
  const sockets = await openMany(cfg.clients, prefix);
  await quiet();
  if (warmUp) await loop(sockets, event, payload, 0.5);
  const result = await measured(async () => {
    const { count, latencies } = await loop(sockets, event, payload, cfg.seconds, ok);
    return summary(count, cfg.seconds, latencies);
  });
  sockets.forEach((s) => s.disconnect());
  return result;
}

const acks = () => looped("acks", "whoami", () => null, (ack) => ack && ack.userId, true);

async function fanout() {
  const members = await openMany(cfg.members, "member");
  const sender = members[0];
  await quiet();
  // Each join tells every member already there: another storm, waited out too.
  await Promise.all(members.map((s) => call(s, "joinRoom", "bench", 120000)));
  await quiet();
  const latencies = [];
  let delivered = 0;
  let waiting = null;
  let expected = 0;
  for (const socket of members) {
    socket.on("message", (m) => {
      if (!m.meta) return;
      latencies.push(performance.now() - m.meta.t);
      delivered++;
      if (delivered >= expected && waiting) { const done = waiting; waiting = null; done(); }
    });
  }
  const send = async (n) => {
    expected += members.length;
    const all = new Promise((resolve) => { waiting = resolve; });
    const ack = await call(sender, "message", { room: "bench", text: `m${n}`, meta: { t: performance.now() } });
    if (!ack || !ack.ok) failures++;
    await Promise.race([all, new Promise((r) => setTimeout(r, 10000))]);
  };
  for (let n = 0; n < 3; n++) await send(n);                              // warm up
  delivered = 0; expected = 0; latencies.length = 0;
  const result = await measured(async () => {
    const until = performance.now() + cfg.seconds * 1000;
    let sent = 0;
    while (performance.now() < until) await send(sent++);
    const lost = expected - delivered;
    if (lost > 0) failures += lost;
    return summary(delivered, cfg.seconds, latencies, { messages: sent });
  });
  members.forEach((s) => s.disconnect());
  return result;
}

const orders = () => looped("buyer", "order:create", () => ORDER, (ack) => ack && ack.ok, false);

async function payments() {
  const sockets = await openMany(cfg.clients, "payer");
  const queues = new Map();
  // Enough pending orders for the timed window, created beforehand.
  await Promise.all(sockets.map(async (socket) => {
    const ids = [];
    for (let n = 0; n < cfg.ordersPerClient; n++) {
      const ack = await call(socket, "order:create", ORDER);
      if (ack && ack.ok) ids.push(ack.order._id); else failures++;
    }
    queues.set(socket, ids);
  }));
  await quiet();
  const result = await measured(async () => {
    const { count, latencies } = await loop(sockets, "order:updateStatus", (socket) => {
      const ids = queues.get(socket);
      return { orderId: ids.length ? ids.pop() : ORDER_ID_NONE, status: "paid" };
    }, cfg.seconds, (ack) => ack && ack.ok);
    return summary(count, cfg.seconds, latencies);
  });
  sockets.forEach((s) => s.disconnect());
  return result;
}
const ORDER_ID_NONE = "000000000000000000000000";

async function connections() {
  const started = performance.now();
  // Idle tabs of 10 users: every new user is announced to every client, so N
  // distinct users would cost N² presence deliveries before anything is measured.
  const idle = await openMany(cfg.idle, "idle", 200, 10);
  const connectRate = idle.length / ((performance.now() - started) / 1000);
  const probes = await openMany(cfg.clients, "probe");
  await quiet();
  await loop(probes, "whoami", () => null, 0.5);                         // warm up
  const result = await measured(async () => {
    const { count, latencies } = await loop(probes, "whoami", () => null, cfg.seconds,
                                            (ack) => ack && ack.userId);
    return summary(count, cfg.seconds, latencies, { opened: idle.length, connectRate });
  }, { opened: idle.length + probes.length });
  [...idle, ...probes].forEach((s) => s.disconnect());
  return result;
}

// A client that was away while `cfg.events` orders were made comes back with
// the offset it last saw: one catch-up is the time from starting to connect
// to its `sync`. It counts only when sync says complete, replayed >= events,
// and every replayed event (each with an offset, in increasing order) arrived
// before sync. A server that tells no X-Log-Offset has no event log: no figure.
function catchUp(auth, from, events, timeoutMs = 10000) {
  return new Promise((resolve) => {
    const started = performance.now();
    const socket = connectTo(auth);
    let received = 0;
    let last = from;
    let ordered = true;
    let done = false;
    const finish = (ok) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.disconnect();
      resolve(ok ? performance.now() - started : null);
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    socket.onAny((event, data) => {
      if (event === "sync") {
        finish(data && data.complete === true && data.replayed >= events
               && data.replayed === received && ordered);
      } else if (data && typeof data.offset === "string") {
        if (!(data.offset > last)) ordered = false;
        last = data.offset;
        received++;
      }
    });
    socket.once("connect_error", () => finish(false));
  });
}

async function catchup() {
  const events = cfg.events ?? 1000;
  const admin = { role: "admin" };
  const response = await fetch(new URL("/api/products", cfg.url));
  await response.arrayBuffer();
  const from = response.headers.get("x-log-offset");
  if (from === null) {
    return measured(async () => ({ unsupported: true, count: 0, seconds: cfg.seconds,
                                   rate: null, p50: null, p99: null, events }));
  }
  // The orders it missed, several sockets of one admin with many acks pending.
  const creators = await openMany(cfg.creators ?? 4, "catchup-admin", 100, 1, admin);
  let next = 0;
  await Promise.all(creators.flatMap((socket) => Array.from({ length: 16 }, async () => {
    while (next < events) {
      next++;
      const ack = await call(socket, "order:create", ORDER, 30000);
      if (!ack || !ack.ok) failures++;
    }
  })));
  await quiet();
  creators.forEach((s) => s.disconnect());
  const auth = { token: token("catchup-admin-0", admin), serverOffset: from };
  if ((await catchUp(auth, from, events)) === null) failures++;           // warm up
  const result = await measured(async () => {
    const latencies = [];
    let count = 0;
    const until = performance.now() + cfg.seconds * 1000;
    await Promise.all(Array.from({ length: cfg.clients ?? 1 }, async () => {
      while (performance.now() < until) {
        const took = await catchUp(auth, from, events);
        if (took === null) { failures++; continue; }
        latencies.push(took);
        count++;
      }
    }));
    return summary(count, cfg.seconds, latencies, { events });
  });
  return result;
}

const scenarios = { acks, fanout, orders, payments, connections, catchup };
const result = await scenarios[cfg.scenario]();
process.stdout.write(JSON.stringify({ ...result, failures }) + "\n");
process.exit(0);
