"""openapi.json is the HTTP side of the server as a machine-readable contract,
and the server keeps it.

The document is valid OpenAPI 3.1 (openapi-spec-validator), every example in it
fits its schema, it names every route of the server, and the server serves it
as GET /openapi.json. Against a real server with orders and notifications in its
database, schemathesis then runs as `schemathesis run` does (its engine, every
phase: examples, coverage, fuzzing, and the stateful phase that follows the
document's links) with every check it has: not_a_server_error,
status_code_conformance, content_type_conformance, response_schema_conformance,
response_headers_conformance (Cache-Control: no-store, X-Log-Offset, the CORS
preflight's), positive_data_acceptance, negative_data_rejection (bad limits,
statuses, cursors, order ids and dev-token parameters must be refused),
unsupported_method (405, with Allow), ignored_auth (a declared token is
enforced: 401 without one or with a bad one) and the rest. It runs as a user,
as an admin, with tokens it makes up, without any token, and on a dev server;
with a fixed seed and a bounded number of examples, so it is repeatable and
takes seconds. (The engine, not schemathesis' pytest plugin, whose lazy
fixtures do not run under this pytest.) Answers random input rarely reaches (an
order of one's own, another user's, an admin's view, paging with `next`, the
dev-token refusals) are asked for one by one and checked the same way, until
every documented status of every operation has come up.
"""

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import jwt
import pytest
import referencing
import referencing.jsonschema
import requests
import schemathesis
import schemathesis.engine.events
from openapi_spec_validator import OpenAPIV31SpecValidator
from schemathesis import engine
from schemathesis.core.failures import FailureGroup

import server as shop_server
from conftest import STICKERS, TSHIRT, ServerProcess, Tab, make_token, new_user_id, one_item_order

PATH = Path(__file__).resolve().parent / "openapi.json"
DOCUMENT = json.loads(PATH.read_text())
URI = "urn:shop-realtime:openapi"
REGISTRY = referencing.Registry().with_resource(URI, referencing.Resource.from_contents(
    DOCUMENT, default_specification=referencing.jsonschema.DRAFT202012))
METHODS = ("get", "head", "options", "post", "put", "patch", "delete", "trace")
STATE_ROUTES = ("/api/orders", "/api/orders/{id}", "/api/notifications")
# Fuzzing: fixed seed, no example database, a bounded number of examples per
# operation (the examples and coverage phases add their own, also fixed).
SEED = 20261202
MAX_EXAMPLES = 12


def validator(pointer: str) -> jsonschema.Draft202012Validator:
    """The schema at `pointer` in the document, its $refs resolved in the document."""
    return jsonschema.Draft202012Validator(
        {"$ref": f"{URI}#{pointer}"}, registry=REGISTRY,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def operations():
    for path, item in DOCUMENT["paths"].items():
        for method in METHODS:
            if method in item:
                yield method, path, item[method]


def resolve(node: dict) -> dict:
    while "$ref" in node:
        node = REGISTRY.resolver(URI).lookup(node["$ref"]).contents
    return node


# -- the document ----------------------------------------------------------------

def test_the_document_is_valid_openapi_3_1():
    assert DOCUMENT["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(DOCUMENT).validate()


def examples():
    """(where, pointer of the schema, example) for every example in the document."""
    for name, schema in DOCUMENT["components"]["schemas"].items():
        for number, example in enumerate(schema.get("examples", [])):
            yield f"schema {name} #{number}", f"/components/schemas/{escape(name)}", example

    def walk(node, pointer):
        if isinstance(node, dict):
            if isinstance(node.get("schema"), dict) and pointer.split("/")[-2:-1] != ["schemas"]:
                if "example" in node:
                    yield pointer, f"{pointer}/schema", node["example"]
                for name, example in node.get("examples", {}).items():
                    yield f"{pointer} {name}", f"{pointer}/schema", resolve(example)["value"]
            for key, value in node.items():
                yield from walk(value, f"{pointer}/{escape(key)}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from walk(value, f"{pointer}/{index}")

    yield from walk(DOCUMENT["paths"], "/paths")
    yield from walk(DOCUMENT["components"]["parameters"], "/components/parameters")
    yield from walk(DOCUMENT["components"]["responses"], "/components/responses")


@pytest.mark.parametrize("where, pointer, example", list(examples()),
                         ids=[where for where, _, _ in examples()])
def test_every_example_fits_its_schema(where, pointer, example):
    problems = [error.message for error in validator(pointer).iter_errors(example)]
    assert not problems, f"{where}: {problems}"


def test_the_document_names_every_route_of_the_server():
    documented = set(DOCUMENT["paths"])
    assert set(shop_server.ROUTES) <= documented, set(shop_server.ROUTES) - documented
    assert {"/", "/health", "/api/products", "/asyncapi.json", "/openapi.json", "/api/info",
            "/metrics", "/vendor/socket.io.min.js", "/dev/token", *STATE_ROUTES} == documented
    # Described elsewhere, or not at all: the Socket.IO endpoint and the Admin UI.
    assert not any(path.startswith(("/socket.io", "/admin-ui")) for path in documented)
    assert DOCUMENT["externalDocs"]["url"] == "/asyncapi.json"


def test_every_route_answers_head_and_all_but_dev_token_a_preflight():
    for path, item in DOCUMENT["paths"].items():
        assert {"get", "head"} <= set(item), path
        assert ("options" in item) == (path != "/dev/token"), path
        assert item["head"].get("security") == item["get"].get("security"), path
        if "options" in item:
            assert item["options"]["security"] == [], path
    for path in STATE_ROUTES:
        assert DOCUMENT["paths"][path]["get"]["security"] == [{"bearerAuth": []}]


def test_the_dev_token_route_is_marked_dev_only():
    for method in ("get", "head"):
        operation = DOCUMENT["paths"]["/dev/token"][method]
        assert operation["x-dev-only"] is True
        assert "DEV ONLY" in operation.get("description", "") or method == "head"
    marked = [(method, path) for method, path, operation in operations()
              if operation.get("x-dev-only")]
    assert marked == [("get", "/dev/token"), ("head", "/dev/token")]


def test_every_answer_has_cache_control_and_every_json_body_a_shared_schema():
    for method, path, operation in operations():
        for status, response in operation["responses"].items():
            response = resolve(response)
            assert response["headers"]["Cache-Control"] == {
                "$ref": "#/components/headers/CacheControl"}, f"{method} {path} {status}"
            json_body = response.get("content", {}).get("application/json")
            if json_body and path not in ("/asyncapi.json", "/openapi.json"):
                assert set(json_body["schema"]) == {"$ref"} or \
                    json_body["schema"].get("items", {}).keys() == {"$ref"}, \
                    f"{method} {path} {status}: an inline schema"
    assert resolve({"$ref": "#/components/headers/CacheControl"})["schema"] == {
        "const": "no-store"}


def test_the_served_document_is_this_file(server):
    status, body, headers = server.get("/openapi.json")
    assert status == 200, body
    assert headers["Content-Type"].split(";")[0] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == DOCUMENT


# -- a server with something to list ---------------------------------------------

@dataclass
class Seeded:
    """What seed() put in a server's database, and the tokens to read it with."""
    tokens: dict[str, str]
    users: dict[str, str]
    orders: list[str]          # alice's, oldest first; the first one paid
    other_order: str           # bob's


def seed(process: ServerProcess) -> Seeded:
    users = {name: new_user_id(name) for name in ("alice", "bob", "admin", "nobody")}
    tokens = {name: make_token(user, "admin" if name == "admin" else "user")
              for name, user in users.items()}
    tabs = {name: Tab(process.url, tokens[name]) for name in ("alice", "bob", "admin")}
    try:
        orders = [tabs["alice"].call("order:create", one_item_order(
            STICKERS, quantity, 25, shippingAddress={"city": "Kyiv"},
            paymentMethod="card"))["order"]["_id"] for quantity in (1, 2, 3)]
        assert tabs["alice"].call("order:updateStatus",
                                  {"orderId": orders[0], "status": "paid"})["ok"]
        other = tabs["bob"].call("order:create", one_item_order(TSHIRT, 1, 100))["order"]["_id"]
        for number in range(3):
            assert tabs["admin"].call("notification:send", {
                "toUserId": users["alice"], "title": f"Note {number}", "body": "Hello",
                "meta": {"number": number}, "priority": "high"})["ok"]
        assert tabs["alice"].call("notification:send", {"toUserId": users["bob"]})["ok"]
    finally:
        for tab in tabs.values():
            tab.close()
    return Seeded(tokens, users, orders, other)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A server of this module's own (JWT_SECRET set: no dev tokens), seeded."""
    process = ServerProcess(tmp_path_factory.mktemp("openapi")).start()
    try:
        process.seeded = seed(process)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def dev_shop(tmp_path_factory):
    """A server on its auto-created dev secret: GET /dev/token hands out tokens."""
    process = ServerProcess(tmp_path_factory.mktemp("openapi-dev"),
                            env={"JWT_SECRET": None}).start()
    yield process
    process.stop()


def load(process: ServerProcess, **config) -> schemathesis.BaseSchema:
    """The document as `process` serves it, set up for a bounded, repeatable run:
    a fixed seed, no example database, MAX_EXAMPLES per operation in the fuzzing
    phase (the examples, coverage and stateful phases derive theirs from the
    document)."""
    generation = {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none",
                  **config.pop("generation", {})}
    return schemathesis.openapi.from_url(process.url + "/openapi.json",
                                         config=schemathesis.Config.from_dict({
                                             "seed": SEED, "base-url": process.url,
                                             "generation": generation, **config}))


@pytest.fixture(scope="module")
def served(shop):
    return load(shop)


@pytest.fixture(scope="module")
def served_by_dev(dev_shop):
    return load(dev_shop)


# -- schemathesis: what the document allows, and what it forbids ------------------

def schemathesis_run(schema: schemathesis.BaseSchema) -> tuple[int, list[str]]:
    """`schemathesis run` on `schema` with every check it has: how many requests
    it made, and what it found (each failure once, with the curl to repeat it)."""
    requests_made, problems, seen = 0, [], set()
    for event in engine.from_schema(schema).execute():
        if isinstance(event, engine.events.ScenarioFinished):
            requests_made += len(event.recorder.interactions)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == engine.Status.SUCCESS:
                        continue
                    info = check.failure_info
                    if info is None:
                        problems.append(f"{event.recorder.label}: check {check.name} crashed")
                        continue
                    failure = info.failure
                    message = failure.message.strip()
                    key = (failure.operation, check.name, failure.title, message.split("\n")[0])
                    if key not in seen:
                        seen.add(key)
                        problems.append(f"[{event.phase.value}] {failure.operation}: {check.name}:"
                                        f" {failure.title}: {message}\n    {info.code_sample}")
        elif isinstance(event, (engine.events.NonFatalError, engine.events.FatalError)):
            problems.append(f"{type(event).__name__}: {getattr(event, 'value', None) or event}")
        elif isinstance(event, engine.events.EngineFinished) \
                and event.stop_reason != engine.StopReason.COMPLETED:
            problems.append(f"schemathesis stopped: {event.stop_reason}")
    return requests_made, problems


def fuzz(process: ServerProcess, token: str | None = None, **config) -> None:
    if token:
        config["headers"] = {"Authorization": token}
    requests_made, problems = schemathesis_run(load(process, **config))
    assert requests_made > 100, f"schemathesis made {requests_made} requests"
    assert not problems, f"{len(problems)} failures:\n" + "\n".join(problems)


def test_schemathesis_as_a_user_finds_nothing(shop):
    fuzz(shop, shop.seeded.tokens["alice"])


def test_schemathesis_as_an_admin_finds_nothing(shop):
    fuzz(shop, shop.seeded.tokens["admin"])


def test_schemathesis_with_tokens_it_makes_up_finds_nothing(shop):
    """Schemathesis writes the Authorization header itself: never a valid token."""
    fuzz(shop)


def test_schemathesis_without_a_token_finds_nothing(shop):
    fuzz(shop, generation={"with-security-parameters": False})


def test_schemathesis_on_a_dev_server_finds_nothing(dev_shop):
    """Dev tokens handed out (and refused), and /api/info saying so."""
    fuzz(dev_shop, token=dev_token(dev_shop, "fuzzer"))


def dev_token(process: ServerProcess, user: str) -> str:
    answer = requests.get(process.url + "/dev/token", params={"user": user}, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()["token"]


# -- every documented answer, asked for -------------------------------------------

@dataclass
class Ask:
    """One request of the test's choosing and what the document and the protocol
    say it gets: `status`, and `body` (a value the JSON must equal, or a check)."""
    label: str
    method: str
    path: str
    status: int
    body: object = None
    token: str | None = None
    path_parameters: dict | None = None
    query: dict | None = None
    headers: dict | None = None
    on_dev: bool = False


def expired_token(user_id: str) -> str:
    return make_token(user_id, exp=int(time.time()) - 3600)


def newest_first(ids: list[str]) -> list[str]:
    return list(reversed(ids))


def asks(seeded: Seeded) -> list[Ask]:
    alice, admin, bob = (seeded.tokens[name] for name in ("alice", "admin", "bob"))
    nobody = seeded.tokens["nobody"]
    mine, paid, other = seeded.orders, seeded.orders[0], seeded.other_order
    unknown = "0123456789abcdef01234567"
    listed = lambda key, ids: lambda body: [x.get("_id", x.get("id")) for x in body[key]] == ids
    notes = lambda titles: lambda body: [n["title"] for n in body["notifications"]] == titles
    unauthorized = lambda reason: {"error": "Unauthorized", "reason": reason}
    invalid = lambda body: body["error"] == "Invalid payload" and body["detail"]
    preflight = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}
    preflights = [Ask(f"a preflight of {path}", "OPTIONS", path, 204, headers=preflight,
                      path_parameters={"id": order_id} if order_id else None)
                  for path in DOCUMENT["paths"] if path != "/dev/token"
                  for order_id in ((paid, "42") if "{id}" in path else (None,))]
    return preflights + [
        Ask("the tester page", "GET", "/", 200),
        Ask("health", "GET", "/health", 200, {"ok": True}),
        Ask("the catalogue", "GET", "/api/products", 200,
            lambda body: {p["_id"] for p in body} >= {TSHIRT, STICKERS}),
        Ask("the AsyncAPI document", "GET", "/asyncapi.json", 200,
            lambda body: body["asyncapi"].startswith("3.")),
        Ask("this document", "GET", "/openapi.json", 200, DOCUMENT),
        Ask("info (production)", "GET", "/api/info", 200,
            lambda body: body["devTokens"] is False),
        Ask("info (dev)", "GET", "/api/info", 200, lambda body: body["devTokens"] is True,
            on_dev=True),
        Ask("metrics", "GET", "/metrics", 200),
        Ask("the client script", "GET", "/vendor/socket.io.min.js", 200),
        # /dev/token
        Ask("a dev token", "GET", "/dev/token", 200,
            lambda body: body["token"].startswith("Bearer "),
            query={"user": "demo-user", "role": "admin", "name": "Demo"}, on_dev=True),
        Ask("a dev token, bad role", "GET", "/dev/token", 400,
            query={"user": "demo-user", "role": "root"}, on_dev=True),
        Ask("a dev token, no user", "GET", "/dev/token", 400, on_dev=True),
        Ask("a dev token for another origin", "GET", "/dev/token", 403,
            query={"user": "demo-user"}, headers={"Origin": "https://example.com"},
            on_dev=True),
        Ask("a dev token with JWT_SECRET set", "GET", "/dev/token", 404, {"error": "Not found"},
            query={"user": "demo-user"}),
        # /api/orders
        Ask("orders, no token", "GET", "/api/orders", 401, unauthorized("no token")),
        Ask("orders, expired token", "GET", "/api/orders", 401, unauthorized("token expired"),
            token=expired_token(seeded.users["alice"])),
        Ask("orders, garbage token", "GET", "/api/orders", 401, unauthorized("invalid token"),
            token="Bearer not.a.jwt"),
        Ask("orders, token of another secret", "GET", "/api/orders", 401,
            unauthorized("invalid token"),
            token=make_token(seeded.users["alice"], secret="another-secret-long-enough-for-hs256")),
        Ask("orders, token in the query string only", "GET", "/api/orders", 401,
            unauthorized("no token"), query={"token": alice}),
        Ask("orders, no token and a bad limit: 401 first", "GET", "/api/orders", 401,
            unauthorized("no token"), query={"limit": "0"}),
        Ask("orders of alice", "GET", "/api/orders", 200,
            lambda body: listed("orders", newest_first(mine))(body) and body["next"] is None,
            token=alice),
        Ask("orders as admin include bob's", "GET", "/api/orders", 200,
            lambda body: {o["_id"] for o in body["orders"]} >= {*mine, other}, token=admin),
        Ask("orders of a user without any", "GET", "/api/orders", 200,
            {"orders": [], "next": None, "offset": ...}, token=nobody),
        Ask("paid orders", "GET", "/api/orders", 200, listed("orders", [paid]),
            token=alice, query={"status": "paid"}),
        Ask("orders, first page of 2", "GET", "/api/orders", 200,
            lambda body: listed("orders", newest_first(mine)[:2])(body) and body["next"],
            token=alice, query={"limit": 2}),
        Ask("orders, limit 0", "GET", "/api/orders", 400, invalid, token=alice,
            query={"limit": "0"}),
        Ask("orders, limit 101", "GET", "/api/orders", 400, invalid, token=alice,
            query={"limit": "101"}),
        Ask("orders, limit abc", "GET", "/api/orders", 400, invalid, token=alice,
            query={"limit": "abc"}),
        Ask("orders, unknown status", "GET", "/api/orders", 400, invalid, token=alice,
            query={"status": "lost"}),
        Ask("orders, a cursor that is none", "GET", "/api/orders", 400, invalid, token=alice,
            query={"before": "not a cursor"}),
        # /api/orders/{id}
        Ask("own order", "GET", "/api/orders/{id}", 200,
            lambda body: body["order"]["_id"] == paid and body["order"]["status"] == "paid",
            token=alice, path_parameters={"id": paid}),
        Ask("own order, id in upper case", "GET", "/api/orders/{id}", 200,
            lambda body: body["order"]["_id"] == paid, token=alice,
            path_parameters={"id": paid.upper()}),
        Ask("bob's order as admin", "GET", "/api/orders/{id}", 200,
            lambda body: body["order"]["_id"] == other, token=admin,
            path_parameters={"id": other}),
        Ask("bob's order as alice", "GET", "/api/orders/{id}", 403, {"error": "Access denied"},
            token=alice, path_parameters={"id": other}),
        Ask("an order that does not exist", "GET", "/api/orders/{id}", 404,
            {"error": "Order not found"}, token=alice, path_parameters={"id": unknown}),
        Ask("a malformed order id", "GET", "/api/orders/{id}", 400,
            {"error": 'Cast to ObjectId failed for value "42" at path "_id"'}, token=alice,
            path_parameters={"id": "42"}),
        Ask("an order, no token", "GET", "/api/orders/{id}", 401, unauthorized("no token"),
            path_parameters={"id": paid}),
        Ask("a malformed order id, no token: 401 first", "GET", "/api/orders/{id}", 401,
            unauthorized("no token"), path_parameters={"id": "42"}),
        # /api/notifications
        Ask("notifications of alice", "GET", "/api/notifications", 200,
            lambda body: notes(["Note 2", "Note 1", "Note 0"])(body) and body["next"] is None,
            token=alice),
        Ask("notifications, first page of 2", "GET", "/api/notifications", 200,
            lambda body: notes(["Note 2", "Note 1"])(body) and body["next"],
            token=alice, query={"limit": 2}),
        Ask("notifications of bob", "GET", "/api/notifications", 200,
            lambda body: len(body["notifications"]) == 1, token=bob),
        Ask("notifications, no token", "GET", "/api/notifications", 401,
            unauthorized("no token")),
        Ask("notifications, limit 0", "GET", "/api/notifications", 400, invalid, token=alice,
            query={"limit": "0"}),
        Ask("notifications, a cursor that is none", "GET", "/api/notifications", 400, invalid,
            token=alice, query={"before": "not a cursor"}),
    ]


def matches(expected, body) -> bool:
    if callable(expected):
        try:
            return bool(expected(body))
        except (KeyError, TypeError, IndexError, AttributeError):
            return False
    if isinstance(expected, dict):
        return isinstance(body, dict) and body.keys() == expected.keys() and all(
            value is ... or matches(value, body[key]) for key, value in expected.items())
    return body == expected


def send(schema, ask: Ask, method: str | None = None):
    """`ask` through schemathesis: sent, and checked against the document."""
    case = schema[ask.path][method or ask.method].Case(
        path_parameters=ask.path_parameters, query=ask.query, headers=ask.headers)
    return case.call_and_validate(headers={"Authorization": ask.token} if ask.token else None)


def test_every_documented_answer_is_given_and_keeps_the_document(shop, dev_shop, served,
                                                                  served_by_dev):
    problems, given = [], set()
    for ask in asks(shop.seeded):
        schema = served_by_dev if ask.on_dev else served
        methods = [ask.method] + (["HEAD"] if ask.method == "GET" else [])
        for method in methods:
            where = f"{method} {ask.path} ({ask.label}; {ask.query or ''}" \
                    f"{ask.path_parameters or ''})"
            try:
                response = send(schema, ask, method)
            except FailureGroup as failures:    # checks of schemathesis, with their report
                problems.append(f"{where}: {failures.message}")
                continue
            except requests.RequestException as error:
                problems.append(f"{where}: {error!r}")
                continue
            given.add((method.lower(), ask.path, str(response.status_code)))
            if response.status_code != ask.status:
                problems.append(f"{where}: status {response.status_code}, expected {ask.status}:"
                                f" {response.text[:300]}")
            elif method != "HEAD" and ask.body is not None \
                    and not matches(ask.body, response.json()):
                problems.append(f"{where}: unexpected body {response.text[:400]}")
    documented = {(method, path, status) for method, path, operation in operations()
                  for status in operation["responses"]}
    # Only on a checkout without the client script (npm ci not run).
    documented -= {("get", "/vendor/socket.io.min.js", "404"),
                   ("head", "/vendor/socket.io.min.js", "404")}
    missing = sorted(documented - given)
    assert not problems and not missing, "\n".join(
        problems + [f"never given: {' '.join(m)}" for m in missing])


@pytest.mark.parametrize("sent, value", [("%C3%A9", "é"), ("%2541", "%41"), ("a%2Fb", "a/b"),
                                         ("%E2%82%AC42", "€42")])
def test_a_malformed_order_id_is_quoted_as_the_client_sent_it(shop, sent, value):
    """The 400 of a malformed id quotes the id the client meant: the path decoded
    once, as UTF-8, like the socket's `Cast to ObjectId failed …` quotes a payload."""
    answer = requests.get(f"{shop.url}/api/orders/{sent}", timeout=5,
                          headers={"Authorization": shop.seeded.tokens["alice"]})
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"error": f'Cast to ObjectId failed for value "{value}" at path "_id"'}


def test_paging_with_next_lists_every_order_and_notification_once(shop):
    """`next` as `before` gives the following page, down to next: null."""
    for route, key, count in (("/api/orders", "orders", len(shop.seeded.orders)),
                              ("/api/notifications", "notifications", 3)):
        seen, before = [], None
        for _ in range(count + 1):
            params = {"limit": 1, **({"before": before} if before else {})}
            answer = requests.get(shop.url + route, params=params, timeout=5,
                                  headers={"Authorization": shop.seeded.tokens["alice"]})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            seen += [item.get("_id", item.get("id")) for item in body[key]]
            before = body["next"]
            if before is None:
                break
        assert len(seen) == len(set(seen)) == count, (route, seen)
        if key == "orders":
            assert seen == list(reversed(shop.seeded.orders))


def test_the_offsets_are_log_positions_a_socket_can_catch_up_from(shop):
    """The offset of every state-on-load answer and X-Log-Offset have the log's
    shape, name the same log, and do not go back."""
    headers = {"Authorization": shop.seeded.tokens["alice"]}
    products = requests.get(shop.url + "/api/products", timeout=5)
    offsets = [products.headers["X-Log-Offset"]]
    for route in ("/api/orders", "/api/notifications", f"/api/orders/{shop.seeded.orders[0]}"):
        offsets.append(requests.get(shop.url + route, headers=headers, timeout=5).json()["offset"])
    assert all(validator("/components/schemas/Offset").is_valid(o) for o in offsets), offsets
    assert len({offset.split("-")[0] for offset in offsets}) == 1, offsets
    assert offsets == sorted(offsets), offsets


def test_a_dev_token_is_good_for_the_state_routes(dev_shop):
    token = dev_token(dev_shop, "dev-reader")
    claims = jwt.decode(token.removeprefix("Bearer "), options={"verify_signature": False})
    assert claims["sub"] == "dev-reader"
    listed = requests.get(dev_shop.url + "/api/orders", headers={"Authorization": token},
                          timeout=5)
    assert listed.status_code == 200, listed.text


def test_head_answers_carry_no_body(shop):
    """HEAD is GET without the body, as the document says: a body would be read
    as the start of the next answer on the same kept-alive connection."""
    host = shop.url.removeprefix("http://")
    with_bodies = []
    for path, item in DOCUMENT["paths"].items():
        path = path.replace("{id}", shop.seeded.orders[0])
        auth = f"Authorization: {shop.seeded.tokens['alice']}\r\n" if "security" in item["get"] \
            else ""
        with socket.create_connection(host.rsplit(":", 1), timeout=5) as connection:
            connection.sendall(f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n"
                               f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close"
                               f"\r\n\r\n".encode())
            received = b""
            while chunk := connection.recv(65536):
                received += chunk
        rest = received.partition(b"\r\n\r\n")[2]
        if not rest.startswith(b"HTTP/1.1 200 "):
            with_bodies.append(f"HEAD {path}: {rest[:60]!r}")
    assert not with_bodies, "HEAD answered with a body:\n" + "\n".join(with_bodies)
