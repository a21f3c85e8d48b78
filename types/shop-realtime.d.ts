// Generated from asyncapi.json by types/generate.py: do not edit.

export type ObjectId = string;
export type Timestamp = string;
export type Offset = string;
export type RoomName = string;
export type RoomRequest = RoomName | {
  room: RoomName;
};
export type JoinRoomRequest = RoomName | {
  room: RoomName;
  since?: Offset;
};
export type RoomAck = {
  ok: true;
  room: string;
} | {
  error: "Access denied";
} | CommonError;
export type JoinRoomAck = {
  ok: true;
  room: string;
  replayed?: number;
  complete?: boolean;
} | {
  error: "Access denied";
} | CommonError;
export type RoomChange = {
  event: "joined" | "left";
  room: string;
  by: string;
  user: PublicUser;
};
export type PublicUser = null | {
  id: string;
  name: string | null;
};
export type Role = "user" | "admin";
export type NotificationType = "info" | "warning" | "error";
export type Priority = "low" | "normal" | "high";
export type Status = "pending" | "paid" | "shipped" | "completed" | "cancelled";
export type Order = {
  _id: ObjectId;
  user: string;
  items: Array<{
    product: string;
    quantity: number;
    price: number;
  }>;
  shippingAddress: Record<string, unknown> | null;
  paymentMethod: string | null;
  total: number;
  status: Status;
  createdAt: Timestamp;
  updatedAt: Timestamp;
};
export type NotInRoom = {
  error: "Not in room";
};
export type Unauthorized = {
  error: "Unauthorized";
  reason: "no token" | "token expired" | "invalid token";
};
export type CommonError = {
  error: "Invalid payload";
  detail: string;
} | {
  error: "Rate limit exceeded";
  retryAfterMs: number;
} | {
  error: "Internal error";
};
export type UnknownEvent = {
  error: string;
} | CommonError;
export type HandshakeAuth = {
  token?: string;
  serverOffset?: Offset | null;
};

/** What the server emits (socket.on). */
export interface ServerToClientEvents {
  /** A user's first live connection opened, or its last one closed. To every connected client. */
  "presence:update": (payload: {
    userId: string;
    status: "online" | "offline";
    at: Timestamp;
  }) => void;
  /** Someone joined a room: to its other members. */
  "joined": (payload: RoomChange) => void;
  /** Someone left a room: to its remaining members. */
  "left": (payload: RoomChange) => void;
  /** A chat message: to every member of the room, the sender included. */
  "message": (payload: {
    room: string;
    text: string;
    from: PublicUser;
    ts: Timestamp;
    meta?: Record<string, unknown>;
    offset: Offset;
  }) => void;
  /** A personal notification: to every tab of the recipient, once each. */
  "notification:received": (payload: {
    event: "notification:received";
    id: ObjectId;
    type: NotificationType;
    title: string | null;
    body: string | null;
    meta: Record<string, unknown> | null;
    priority: Priority;
    from: string;
    ts: Timestamp;
    offset?: Offset;
  }) => void;
  /** A new order: to its owner and the admins, once per socket. */
  "order:created": (payload: {
    event: "order:created";
    order: Order;
    offset: Offset;
  }) => void;
  /** An order's status changed: to its owner and the admins, once per socket. */
  "order:updated": (payload: {
    event: "order:updated";
    order: Order;
    offset: Offset;
  }) => void;
  /** A product's stock moved (a payment, or a paid order cancelled): to every connected client. */
  "product:stockUpdated": (payload: {
    event: "product:stockUpdated";
    productId: ObjectId;
    stock: number;
    delta: number;
    at: Timestamp;
    offset: Offset;
  }) => void;
  /** Someone is typing: to the user it is meant for, or to the room's other members. */
  "typing": (payload: {
    event: "typing";
    from: string;
    room?: string;
    at: Timestamp;
  }) => void;
  /** The connect catch-up is over: to a socket that connected with auth.serverOffset, once. */
  "sync": (payload: {
    event: "sync";
    offset: Offset;
    replayed: number;
    complete: boolean;
  }) => void;
}

/** What a client emits (socket.emit / emitWithAck), with its ack. */
export interface ClientToServerEvents {
  /** Join a room. Anyone. */
  "joinRoom": (payload: JoinRoomRequest, ack: (ack: JoinRoomAck) => void) => void;
  /** Leave a room. Anyone; acks also when not a member. */
  "leaveRoom": (payload: RoomRequest, ack: (ack: RoomAck) => void) => void;
  /** Send a chat message to a room the sender is in. Anyone in the room. */
  "message": (payload: {
    room: RoomName;
    text: string;
    meta?: Record<string, unknown>;
  }, ack: (ack: {
    ok: true;
    sentTo: string;
  } | NotInRoom | CommonError) => void) => void;
  /** Who the server thinks the socket is. Needs a user. */
  "whoami": (payload: null, ack: (ack: {
    userId: string;
    role: Role;
    email: string | null;
    isVerified: boolean;
  } | Unauthorized | CommonError) => void) => void;
  /** A personal notification, saved before the ack, then delivered. Needs a user. */
  "notification:send": (payload: {
    toUserId: string;
    type?: NotificationType;
    title?: string | null;
    body?: string | null;
    meta?: Record<string, unknown> | null;
    priority?: Priority;
  }, ack: (ack: {
    ok: true;
    queued: boolean;
    saved: true;
    id: ObjectId;
  } | {
    error: "toUserId is required" | "Invalid type" | "Invalid priority";
  } | Unauthorized | CommonError) => void) => void;
  /** Create a pending order. Needs a user. */
  "order:create": (payload: {
    items: Array<{
      product: ObjectId;
      quantity: number;
      price: number;
    }>;
    total: number;
    shippingAddress?: Record<string, unknown> | null;
    paymentMethod?: string | null;
    idempotencyKey?: string | null;
  }, ack: (ack: {
    ok: true;
    order: Order;
    duplicate?: true;
  } | {
    error: string;
  } | Unauthorized | CommonError) => void) => void;
  /** Change an order's status. The owner may set paid and cancelled; an admin any allowed transition. */
  "order:updateStatus": (payload: {
    orderId: ObjectId;
    status: Status;
  }, ack: (ack: {
    ok: true;
    order: Order;
  } | {
    error: string;
  } | Unauthorized | CommonError) => void) => void;
  /** A typing indicator, to one user or to a room the sender is in. Needs a user. */
  "typing": (payload: {
    toUserId: string;
  } | {
    room: RoomName;
  }, ack: (ack: {
    ok: true;
    mode: "personal" | "room";
  } | NotInRoom | Unauthorized | CommonError) => void) => void;
}
