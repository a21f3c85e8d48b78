// A typed client: socket.io-client's Socket with the protocol's events, from
// types/shop-realtime.d.ts (generated from asyncapi.json). Check it with
// `npx tsc --noEmit --strict --module nodenext --target es2022 examples/typed-client.ts`.
import { io, type Socket } from "socket.io-client";
import type {
  ClientToServerEvents, HandshakeAuth, Offset, ServerToClientEvents,
} from "../types/shop-realtime.js";

// The greatest offset received (a real client keeps it, e.g. in localStorage): `auth` is a
// function, read again on every reconnect, so a reconnect catches up on what it missed.
let serverOffset: Offset | null = null;
const keep = ({ offset }: { offset: Offset }) => {
  if (serverOffset === null || offset > serverOffset) serverOffset = offset;
};
const auth = (cb: (data: HandshakeAuth) => void) =>
  cb({ token: "Bearer eyJ...", serverOffset });   // python server.py token alice

const socket: Socket<ServerToClientEvents, ClientToServerEvents> = io("http://127.0.0.1:8000", {
  transports: ["websocket"],
  auth,
});

socket.on("order:created", (created) => {
  keep(created);
  console.log("created", created.order._id, created.order.total);
});
socket.on("product:stockUpdated", (update) => {
  keep(update);
  console.log(update.productId, update.stock);
});
socket.on("sync", ({ offset, replayed, complete }) => {
  serverOffset = offset;              // the log's newest offset: the new starting point
  if (!complete) console.log("too much missed: reload the orders over HTTP");
  else console.log(`caught up on ${replayed} events`);
});

// A room keeps its own offset: rejoining with `since` replays the messages missed.
const lastMessage = new Map<string, Offset>();
socket.on("message", ({ room, text, offset }) => {
  lastMessage.set(room, offset);
  console.log(room, text);
});
const since = lastMessage.get("lobby");
const joined = await socket.timeout(5000).emitWithAck(
  "joinRoom", since ? { room: "lobby", since } : "lobby");
if ("ok" in joined && joined.complete === false) console.log("some lobby messages are gone");

const created = await socket.timeout(5000).emitWithAck("order:create", {
  items: [{ product: "64a1b2c3d4e5f67890123456", quantity: 2, price: 100 }],
  total: 200,
});
if ("ok" in created) {
  const paid = await socket.timeout(5000).emitWithAck("order:updateStatus", {
    orderId: created.order._id, status: "paid",
  });
  console.log("ok" in paid ? paid.order.status : paid.error);
} else {
  console.log(created.error);   // e.g. "Unauthorized", with created.reason
}
socket.disconnect();
