// The whole flow on the official client, missing nothing: node examples/flow.mjs [URL] [--step]
// --step waits for Enter before each step: a presenter's pace, and the moment to
// restart the server (Ctrl-C, python server.py) and see that nothing is lost.
import { io } from "socket.io-client";
import { createInterface } from "node:readline";

const URL = process.argv.slice(2).find((arg) => !arg.startsWith("--")) ?? "http://127.0.0.1:8000";
const fail = (message) => { console.error(message); process.exit(1); };
const token = async (user, role = "user") => {
  const response = await fetch(`${URL}/dev/token?user=${user}&role=${role}`)
    .catch((error) => fail(`cannot reach ${URL}: ${error.cause?.code ?? error.message}`));
  const body = await response.json();
  return body.token ?? fail(`no dev token (${response.status}): ${body.error}`);
};

// Durable events carry an offset. Each socket keeps the greatest it has received and
// sends it on every (re)connect: the server first replays what the socket missed,
// then says `sync`. Room messages count per room, sent as `since` when it rejoins.
// An offset seen twice, or going backwards, would be a repeated or lost update: stop.
const DURABLE = ["order:created", "order:updated", "product:stockUpdated",
                 "notification:received", "message"];
const about = (d) => d.order ? `${d.order._id} ${d.order.status}`
  : d.productId ? `${d.productId} stock ${d.stock}`
  : d.room ? `${d.room}: ${d.text}` : `${d.title}: ${d.body}`;
const keep = (socket, event, { room, offset }) => {
  const last = event === "message" ? socket.since[room] : socket.offset;
  if (last && offset <= last) {
    fail(`${socket.name} got ${event} ${offset} ${offset === last ? "twice" : `after ${last}`}`);
  }
  if (event === "message") socket.since[room] = offset; else socket.offset = offset;
};

// A socket, connecting (await socket.ready). Acks survive a restart: an emit left
// unanswered (ackTimeout) or cut off is sent again once reconnected (retries).
const open = async (name, user, role) => {
  const bearer = await token(user, role);
  const socket = io(URL, { transports: ["websocket"], ackTimeout: 5000, retries: 5,
    auth: (send) => send({ token: bearer, serverOffset: socket.offset }) });
  Object.assign(socket, { name, offset: null, since: {} });
  for (const event of DURABLE) socket.on(event, (data) => {
    keep(socket, event, data);
    console.log(`${name} ← ${event} ${about(data)} @ ${data.offset}`);
  });
  socket.on("sync", ({ offset, replayed, complete }) => {
    socket.offset = offset;
    console.log(`${name} ← sync: replayed ${replayed}, complete ${complete} @ ${offset}`);
  });
  socket.on("disconnect", (reason) => reason === "io client disconnect" ||
    console.log(`${name} lost the connection (${reason}), reconnecting…`));
  socket.on("connect", () => {      // back in its rooms, with the messages it missed
    socket.rejoined = Promise.all(Object.keys(socket.since).map((room) =>
      join(socket, room).then((ack) => console.log(`${name} rejoined`, ack))));
  });
  const refused = (error) => fail(`${name} cannot connect: ${error.message}`);
  socket.once("connect_error", refused);    // the first time; later the client retries
  socket.ready = next(socket, "connect").then(() => socket.off("connect_error", refused));
  return socket;
};
const next = (socket, event) => new Promise((resolve) => {
  const late = setTimeout(() => fail(`${socket.name} got no ${event} within 30 s`), 30000);
  socket.once(event, (data) => { clearTimeout(late); resolve(data); });
});
// Every ack is checked: an error stops the script with the server's own words.
const call = async (socket, event, payload) => {
  const ack = await socket.emitWithAck(event, payload)
    .catch((error) => fail(`${event}: no answer (${error.message})`));
  if (ack && typeof ack === "object" && "error" in ack) {
    const detail = ack.detail ? ` (${ack.detail})` : "";
    fail(`${event} failed: ${ack.error}${detail}` +
      (/Insufficient stock/.test(ack.error) ? " — python server.py reset restocks the demo catalogue" : ""));
  }
  return ack;
};
const join = (socket, room) => call(socket, "joinRoom", { room, since: socket.since[room] ??= null });

const input = process.argv.includes("--step") ? createInterface({ input: process.stdin }) : null;
const lines = input?.[Symbol.asyncIterator]();
const step = async (what) => {
  console.log(`\n== ${what}${input ? " [Enter]" : ""}`);
  await lines?.next();
};

await step("alice and the admin connect, and join the lobby");
const alice = await open("alice", "alice");
const admin = await open("admin", "admin-1", "admin");
await Promise.all([alice.ready, admin.ready]);
console.log("whoami", await call(alice, "whoami", null));
console.log("joinRoom", await join(alice, "lobby"), await join(admin, "lobby"));

await step("alice says hi");
const heard = next(admin, "message");
console.log("message", await call(alice, "message", { room: "lobby", text: "hi" }));
await heard;

await step("alice places the order (a retried create is the same order: idempotencyKey)");
const seen = Promise.all([next(alice, "order:created"), next(admin, "order:created")]);
const { order } = await call(alice, "order:create", {
  items: [{ product: "64a1b2c3d4e5f67890123456", quantity: 2, price: 100 },
          { product: "64a1b2c3d4e5f67890123457", quantity: 1, price: 150 }],
  total: 350, idempotencyKey: crypto.randomUUID(),
});
console.log("created", order._id, order.status);
await seen;

await step("alice drops her connection; meanwhile the admin pays and ships her order");
alice.disconnect();
console.log("paid", (await call(admin, "order:updateStatus", { orderId: order._id, status: "paid" })).order.status);
console.log("shipped", (await call(admin, "order:updateStatus", { orderId: order._id, status: "shipped" })).order.status);

await step("alice reconnects: first what she missed, then sync");
const synced = next(alice, "sync");
alice.connect();
await synced;
await alice.rejoined;

await step("alice notifies bob, who is offline; he gets it when he connects");
const offline = `bob-${Date.now()}`;
console.log("notify", await call(alice, "notification:send", { toUserId: offline, title: "Hi", body: "Test" }));
const bob = await open("bob", offline);
await Promise.all([bob.ready, next(bob, "notification:received")]);
input?.close();
for (const socket of [alice, admin, bob]) socket.disconnect();
