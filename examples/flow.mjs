// The whole flow on the official client: node examples/flow.mjs [URL]
import { io } from "socket.io-client";

const URL = process.argv[2] ?? "http://127.0.0.1:8000";
const fail = (message) => { console.error(message); process.exit(1); };
const token = async (user, role = "user") => {
  const response = await fetch(`${URL}/dev/token?user=${user}&role=${role}`)
    .catch((error) => fail(`cannot reach ${URL}: ${error.cause?.code ?? error.message}`));
  const body = await response.json();
  return body.token ?? fail(`no dev token (${response.status}): ${body.error}`);
};
const connect = async (user, role) => {
  const socket = io(URL, { transports: ["websocket"], auth: { token: await token(user, role) } });
  await new Promise((resolve, reject) => { socket.on("connect", resolve); socket.on("connect_error", reject); });
  return socket;
};
// Every ack is checked: an error stops the script with the server's own words.
const call = async (socket, event, payload) => {
  const ack = await socket.timeout(5000).emitWithAck(event, payload);
  if (ack && typeof ack === "object" && "error" in ack) {
    const detail = ack.detail ? ` (${ack.detail})` : "";
    fail(`${event} failed: ${ack.error}${detail}` +
      (/Insufficient stock/.test(ack.error) ? " — python server.py reset restocks the demo catalogue" : ""));
  }
  return ack;
};

const alice = await connect("alice");
const admin = await connect("admin-1", "admin");
console.log("whoami", await call(alice, "whoami", null));
console.log("joinRoom", await call(alice, "joinRoom", "lobby"), await call(admin, "joinRoom", "lobby"));
admin.on("message", (m) => console.log("admin got message", m.text));
console.log("message", await call(alice, "message", { room: "lobby", text: "hi" }));

const { order } = await call(alice, "order:create", {
  items: [{ product: "64a1b2c3d4e5f67890123456", quantity: 2, price: 100 },
          { product: "64a1b2c3d4e5f67890123457", quantity: 1, price: 150 }],
  total: 350,
});
console.log("created", order._id, order.status);
console.log("paid", (await call(alice, "order:updateStatus", { orderId: order._id, status: "paid" })).order.status);
console.log("shipped", (await call(admin, "order:updateStatus", { orderId: order._id, status: "shipped" })).order.status);

const offline = `bob-${Date.now()}`;
console.log("notify", await call(alice, "notification:send", { toUserId: offline, title: "Hi", body: "Test" }));
const bob = io(URL, { transports: ["websocket"], auth: { token: await token(offline) } });
bob.on("notification:received", (n) => {
  console.log("bob got on connect:", n.title, n.body);
  for (const s of [alice, admin, bob]) s.disconnect();
});
