"""TypeScript declarations of the protocol, from asyncapi.json.

    python types/generate.py > types/shop-realtime.d.ts

They type socket.io-client's sockets: `Socket<ServerToClientEvents,
ClientToServerEvents>` (see examples/typed-client.ts). The tests check that the
committed file is what this prints and that tsc accepts the typed example.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = json.loads((ROOT / "asyncapi.json").read_text())
MESSAGES = DOCUMENT["components"]["messages"]


def ts(schema: dict, indent: str = "") -> str:
    """The TypeScript type of the JSON Schema subset asyncapi.json uses."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    for union in ("oneOf", "anyOf"):
        if union in schema:
            options = schema[union]
            if any(set(option) <= {"pattern", "description"} for option in options):
                return "string"                         # a pattern has no TypeScript type
            return " | ".join(dict.fromkeys(ts(option, indent) for option in options))
    types = schema.get("type")
    if isinstance(types, list):
        return " | ".join(ts({**schema, "type": t}, indent) for t in types)
    if types == "object":
        return object_type(schema, indent)
    if types == "array":
        return f"Array<{ts(schema.get('items', {}), indent)}>"
    return {"string": "string", "integer": "number", "number": "number", "boolean": "boolean",
            "null": "null"}.get(types, "unknown")


def object_type(schema: dict, indent: str) -> str:
    properties = schema.get("properties", {})
    if not properties:
        return "Record<string, unknown>"
    inner = indent + "  "
    fields = [f"{inner}{json.dumps(name) if ':' in name else name}"
              f"{'' if name in schema.get('required', []) else '?'}: {ts(value, inner)};"
              for name, value in properties.items()]
    return "{\n" + "\n".join(fields) + f"\n{indent}}}"


def message_of(operation: dict, reply: bool = False) -> dict:
    ref = (operation["reply"] if reply else operation)["messages"][0]["$ref"]
    return MESSAGES[ref.rsplit("/", 1)[1]]


def declarations() -> str:
    lines = ["// Generated from asyncapi.json by types/generate.py: do not edit.", ""]
    for name, schema in DOCUMENT["components"]["schemas"].items():
        lines.append(f"export type {name} = {ts(schema)};")
    operations = DOCUMENT["operations"].values()
    lines += ["", "/** What the server emits (socket.on). */",
              "export interface ServerToClientEvents {"]
    for operation in operations:
        if operation["action"] == "send":
            message = message_of(operation)
            lines.append(f"  /** {operation['summary']} */")
            lines.append(f"  {json.dumps(message['name'])}: (payload: "
                         f"{ts(message['payload'], '  ')}) => void;")
    lines += ["}", "", "/** What a client emits (socket.emit / emitWithAck), with its ack. */",
              "export interface ClientToServerEvents {"]
    for operation in operations:
        if operation["action"] == "receive":
            request, ack = message_of(operation), message_of(operation, reply=True)
            payload = ts(request["payload"], "  ") if request["payload"].get("type") or \
                "$ref" in request["payload"] or "oneOf" in request["payload"] else "null"
            lines.append(f"  /** {operation['summary']} */")
            lines.append(f"  {json.dumps(request['name'])}: (payload: {payload},"
                         f" ack: (ack: {ts(ack['payload'], '  ')}) => void) => void;")
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(declarations())
