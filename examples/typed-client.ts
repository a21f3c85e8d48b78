// A typed client: socket.io-client's Socket with the protocol's events, from
// types/shop-realtime.d.ts (generated from asyncapi.json). Check it with
// `npx tsc --noEmit --strict --module nodenext --target es2022 examples/typed-client.ts`.
import { io, type Socket } from "socket.io-client";
import type { ClientToServerEvents, ServerToClientEvents } from "../types/shop-realtime.js";

const socket: Socket<ServerToClientEvents, ClientToServerEvents> = io("http://127.0.0.1:8000", {
  transports: ["websocket"],
  auth: { token: "Bearer eyJ..." },   // python server.py token alice
});

socket.on("order:created", ({ order }) => console.log("created", order._id, order.total));
socket.on("product:stockUpdated", (update) => console.log(update.productId, update.stock));

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
