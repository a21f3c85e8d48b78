"""asyncapi.json is the protocol as a machine-readable contract, and the
server keeps it.

The document is a valid AsyncAPI 3 document by the official parser
(@asyncapi/parser); the server serves it; every example in it fits its schema
and, sent to a fresh server, gets the ack the document gives for it; the
request schemas refuse what the server refuses for shape; and the README names
the same events and error strings. Throughout the suite, every ack and server
event a test client receives is checked against it too (conftest.CONTRACT).
"""

import json
import re
import subprocess
import sys

import pytest

from conftest import CONTRACT, SERVER, make_token, new_user_id

DOCUMENT = CONTRACT.document
MESSAGES = DOCUMENT["components"]["messages"]
README = (SERVER.parent / "README.md").read_text()
GENERATED = {"_id", "id", "user", "createdAt", "updatedAt"}   # made by the server each time

PARSE = """
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";
const { document, diagnostics } = await new Parser().parse(readFileSync("asyncapi.json", "utf8"));
// 0 is an error, 1 a warning; 2 and 3 are information and hints.
const problems = diagnostics.filter((d) => d.severity <= 1)
  .map((d) => `${d.code} at ${d.path.join(".")}: ${d.message}`);
console.log(JSON.stringify({ parsed: Boolean(document), problems }));
"""


def test_the_document_is_a_valid_asyncapi_3_document_by_the_official_parser():
    done = subprocess.run(["node", "--input-type=module", "-e", PARSE], cwd=SERVER.parent,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"parsed": True, "problems": []}
    assert DOCUMENT["asyncapi"].startswith("3.0")


def test_the_server_serves_the_document_as_json_with_cors(server):
    status, body, headers = server.get("/asyncapi.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == DOCUMENT
    assert headers["Access-Control-Allow-Origin"] == "*"


def test_the_document_describes_every_event_of_the_protocol():
    assert sorted(CONTRACT.acks) == sorted(CONTRACT.requests) == [
        "joinRoom", "leaveRoom", "message", "notification:send", "order:create",
        "order:updateStatus", "typing", "whoami"]
    assert sorted(CONTRACT.emits) == [
        "joined", "left", "message", "notification:received", "order:created", "order:updated",
        "presence:update", "product:stockUpdated", "sync", "typing"]
    channel = DOCUMENT["channels"]["shop"]
    assert channel["address"] == "/" and DOCUMENT["servers"]["local"]["pathname"] == "/socket.io"


EXAMPLES = [(key, example) for key, message in MESSAGES.items()
            for example in message.get("examples", [])]


@pytest.mark.parametrize("key, example", EXAMPLES,
                         ids=[f"{key}: {example['name']}" for key, example in EXAMPLES])
def test_every_example_fits_its_schema(key, example):
    assert CONTRACT.problems(CONTRACT.message(key), example["payload"]) == []


def without_generated(value):
    if isinstance(value, dict):
        return {k: without_generated(v) for k, v in value.items() if k not in GENERATED}
    if isinstance(value, list):
        return [without_generated(v) for v in value]
    return value


REQUESTS = [(event, example) for event, key in CONTRACT.requests.items()
            for example in MESSAGES[key].get("examples", [])]


@pytest.mark.parametrize("event, example", REQUESTS,
                         ids=[f"{event}: {example['name']}" for event, example in REQUESTS])
def test_every_request_example_gets_the_documented_ack_from_a_fresh_server(start_server, connect,
                                                                          event, example):
    server = start_server()
    documented = {e["name"]: e["payload"] for e in MESSAGES[CONTRACT.acks[event]]["examples"]}
    assert example["name"] in documented, f"no ack example named {example['name']!r}"
    anonymous = example["name"] == "anonymous"
    tab = connect(token=None if anonymous else make_token("alice"), on=server)
    if example["name"] != "not a member":
        tab.call("joinRoom", "lobby")
    ack = tab.call(event, example["payload"])        # checked against the schema by Tab.call
    assert without_generated(ack) == without_generated(documented[example["name"]])


@pytest.mark.parametrize("event, payload", [
    ("order:create", {"total": 350}),                                   # no items
    ("order:create", {"items": [], "total": 0}),
    ("order:create", {"items": [{"product": "x", "quantity": 1, "price": 1}], "total": 1}),
    ("notification:send", {"title": "Hi"}),                             # no toUserId
    ("joinRoom", 5),                                                    # a number for a room
    ("joinRoom", {"room": "lobby", "since": 5}),                        # a number for an offset
    ("leaveRoom", {"room": ["lobby"]}),
    ("message", {"room": "lobby"}),                                     # no text
    ("typing", {"toUserId": "a", "room": "lobby"}),                     # both
    ("typing", {}),                                                     # neither
    ("order:updateStatus", {"orderId": 5, "status": "paid"}),
])
def test_request_schemas_refuse_what_the_server_refuses_for_shape(connect, event, payload):
    assert CONTRACT.problems(CONTRACT.message(CONTRACT.requests[event]), payload) != []
    tab = connect(new_user_id())
    tab.call("joinRoom", "lobby")
    assert "error" in tab.call(event, payload)


def document_error_strings() -> set[str]:
    """Every fixed error string the document lists (consts and enums of `error`)."""
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            error = node.get("properties", {}).get("error", {})
            found.update([error["const"]] if "const" in error else error.get("enum", []))
            for option in error.get("anyOf", []):
                found.update([option["const"]] if "const" in option else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(DOCUMENT["components"])
    return found


PLACEHOLDERS = {"<v>": "x", "<id>": "64a1b2c3d4e5f67890123456", "<p>": "100", "<t>": "350",
                "<from>": "pending", "<to>": "shipped", "items.N": "items.0"}


def readme_errors(section: str) -> list[str]:
    """The error strings of the README's table for one event, placeholders filled in."""
    table = README.split(f"#### {section}", 1)[1].split("####", 1)[0]
    errors = []
    for text in re.findall(r"^\|[^|\n]+\| `([^`]+)` \|$", table, re.MULTILINE):
        for placeholder, value in PLACEHOLDERS.items():
            text = text.replace(placeholder, value)
        errors.append(text)
    return errors


def test_the_readme_and_the_document_name_the_same_events_and_error_strings():
    events_table = README.split("### Events", 1)[1].split("####", 1)[0]
    readme_events = set(re.findall(r"`([\w:]+)`", events_table))
    assert readme_events == set(CONTRACT.requests) | set(CONTRACT.emits)
    for error in document_error_strings():
        assert error in README, f"the README never names the error {error!r}"
    for event in ("order:create", "order:updateStatus"):
        errors = readme_errors(event)
        assert len(errors) >= 6, errors
        for error in errors:
            assert CONTRACT.ack_problems(event, {"error": error}) == [], \
                f"the README's {event} error {error!r} is not one of the document's"


# -- TypeScript declarations for typed sockets ------------------------------------

TSC = [str(SERVER.parent / "node_modules" / ".bin" / "tsc"), "--noEmit", "--strict",
       "--module", "nodenext", "--target", "es2022"]


def test_the_typescript_declarations_are_the_ones_the_document_generates():
    done = subprocess.run([sys.executable, str(SERVER.parent / "types" / "generate.py")],
                          capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout == (SERVER.parent / "types" / "shop-realtime.d.ts").read_text(), \
        "run: python types/generate.py > types/shop-realtime.d.ts"


def test_a_typed_client_compiles_and_a_payload_off_the_contract_does_not(tmp_path):
    example = SERVER.parent / "examples" / "typed-client.ts"
    done = subprocess.run([*TSC, str(example)], capture_output=True, text=True, timeout=120,
                          check=False, cwd=SERVER.parent)
    assert done.returncode == 0, done.stdout
    # The same client with one field misspelt and one status unknown must not compile.
    (tmp_path / "examples").mkdir()
    (tmp_path / "types").symlink_to(SERVER.parent / "types")
    (tmp_path / "node_modules").symlink_to(SERVER.parent / "node_modules")
    (tmp_path / "package.json").write_text('{"type": "module"}')
    wrong = tmp_path / "examples" / "wrong.ts"
    wrong.write_text(example.read_text().replace("total: 200,", "totl: 200,")
                     .replace('status: "paid"', 'status: "lost"'))
    done = subprocess.run([*TSC, str(wrong)], capture_output=True, text=True, timeout=120,
                          check=False, cwd=tmp_path)
    assert done.returncode != 0
    assert "'totl' does not exist" in done.stdout and '"lost"' in done.stdout, done.stdout
