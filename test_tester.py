"""ws-tester.html in real headless Chromium against a real server.py.

Chromium comes from the system (Debian's `chromium`; another path in $CHROMIUM)
and Playwright drives it. The machine has no internet: every test here is also a
test that the page works offline. The page holds several clients; every selector
is scoped to one of them by its data-client number.
"""

import base64
import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import threading
import urllib.parse
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import MUG, SERVER, TSHIRT, free_port, make_token

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
CLIENT_SCRIPT = SERVER.parent / "node_modules" / "socket.io-client" / "dist" / "socket.io.min.js"
CDN = "https://cdn.jsdelivr.net/**"


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"Chromium is needed at {CHROMIUM} (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def dev_server(start_server):
    """A server on its auto-created dev secret, so the demo identity buttons work."""
    return start_server(env={"JWT_SECRET": None})


class Client:
    """One client of the page (`section.client[data-client=N]`): its steps, cards and log."""

    def __init__(self, page, number: int = 1) -> None:
        self.page, self.number = page, number
        self.root = page.locator(f'section.client[data-client="{number}"]')
        self.log = self.root.locator("ol.log")
        self.status = self.root.locator(".status")

    def locator(self, selector: str):
        return self.root.locator(selector)

    def button(self, name: str):
        return self.root.get_by_role("button", name=name, exact=True)

    def card(self, event: str):
        return self.root.locator(f'form[data-event="{event}"]')

    def send(self, event: str) -> None:
        self.card(event).get_by_role("button", name="Send").click()

    def ack(self, event: str):
        return self.card(event).locator(".ack")

    def connect_as(self, button: str) -> None:
        self.button(button).click()
        expect(self.locator(".token")).to_have_value(re.compile("^Bearer "))
        self.button("Connect").click()
        expect(self.status).to_contain_text("connected ·")

    def evaluate(self, script: str):
        """`script` is a function of this client's page object."""
        return self.page.evaluate(
            f"n => ({script})(tester.clients.find(c => c.no === n))", self.number)

    def socket_id(self) -> str:
        return self.evaluate("c => c.socket.id")

    def entries(self) -> list[dict]:
        """What this client logged, as Export writes it."""
        return self.page.evaluate(
            "n => tester.journal.filter(e => e.clientNo === n)", self.number)

    def stock(self, product: str):
        return self.locator(f'.stock tr[data-product="{product}"] td:last-child')


class PageTab:
    """One tab of ws-tester.html, with every console error it logs; `client` is its first."""

    def __init__(self, browser, url: str, viewport=None) -> None:
        self.context = browser.new_context(viewport=viewport or {"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.console_errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        # Offline: anything bound for the CDN fails, as in a workshop without internet.
        self.page.route(CDN, lambda route: route.abort())
        self.page.goto(url)
        self.page.wait_for_function("window.testerReady === true")
        self.client = Client(self.page, 1)
        self.log = self.client.log

    def add_client(self) -> Client:
        count = self.page.locator("section.client").count()
        self.page.get_by_role("button", name="+ Add client").click()
        client = Client(self.page, count + 1)
        expect(client.root).to_be_attached()
        return client

    def card(self, event: str):
        return self.client.card(event)

    def send(self, event: str) -> None:
        self.client.send(event)

    def ack(self, event: str):
        return self.client.ack(event)

    def connect_as(self, button: str) -> None:
        self.client.connect_as(button)

    def socket_id(self) -> str:
        return self.client.socket_id()

    def close(self) -> None:
        self.context.close()


def no_sideways_scroll(page) -> bool:
    return page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth")


@pytest.fixture
def open_tester(browser):
    tabs = []

    def open_tab(url, **kwargs):
        tab = PageTab(browser, url, **kwargs)
        tabs.append(tab)
        return tab

    yield open_tab
    for tab in tabs:
        tab.close()


def test_the_original_flow_by_clicking_as_a_user_and_an_admin(dev_server, open_tester, tmp_path):
    user, admin = open_tester(dev_server.url), open_tester(dev_server.url)
    expect(user.log).to_contain_text(f"socket.io-client loaded from the server at {dev_server.url}")

    user.connect_as("demo user")
    expect(user.log).to_contain_text(f"CONNECTED: {user.socket_id()}")
    expect(user.log).to_contain_text("← presence:update")
    admin.connect_as("demo admin")
    expect(user.client.locator(".online")).to_contain_text("demo-admin")

    user.send("joinRoom")
    expect(user.ack("joinRoom")).to_contain_text('"ok": true')
    expect(user.client.locator(".rooms")).to_contain_text("lobby")
    admin.send("joinRoom")
    expect(user.log).to_contain_text("← joined")

    user.send("message")
    for tab in (user, admin):
        expect(tab.log).to_contain_text("← message")
        expect(tab.log).to_contain_text('"text": "Hello!"')

    user.send("order:create")
    expect(user.ack("order:create")).to_contain_text('"status": "pending"')
    expect(user.ack("order:create")).to_contain_text('"total": 350')
    expect(admin.log).to_contain_text("← order:created")
    order_id = re.search(r'"_id": "([0-9a-f]{24})"', user.ack("order:create").inner_text())[1]
    for tab in (user, admin):  # the status card picks up the order without typing
        expect(tab.card("order:updateStatus").locator("textarea")).to_have_value(
            re.compile(order_id))

    user.card("order:updateStatus").get_by_role("button", name="order:updateStatus to paid").click()
    expect(user.ack("order:updateStatus")).to_contain_text('"status": "paid"')
    for tab in (user, admin):
        expect(tab.log).to_contain_text("← order:updated")
        expect(tab.log).to_contain_text("← product:stockUpdated")
        expect(tab.log).to_contain_text('"delta": -2')

    admin.card("order:updateStatus").get_by_role(
        "button", name="order:updateStatus to shipped").click()
    expect(admin.ack("order:updateStatus")).to_contain_text('"status": "shipped"')
    expect(user.log).to_contain_text('"status": "shipped"')

    user.send("notification:send")
    expect(user.ack("notification:send")).to_contain_text('"saved": true')
    expect(admin.log).to_contain_text("← notification:received")
    expect(admin.log).to_contain_text('"from": "demo-user"')

    admin.send("whoami")
    expect(admin.ack("whoami")).to_contain_text('"role": "admin"')
    user.send("typing")
    expect(admin.log).to_contain_text("← typing")

    user.page.screenshot(path=tmp_path / "tester-user.png", full_page=True)
    admin.page.screenshot(path=tmp_path / "tester-admin.png", full_page=True)
    assert user.console_errors == [] and admin.console_errors == []


def test_verbose_shows_the_raw_engine_io_and_socket_io_packets(dev_server, open_tester):
    tab = open_tester(dev_server.url)
    tab.connect_as("demo user")
    tab.page.get_by_label("verbose (raw packets)").check()
    tab.send("whoami")
    expect(tab.log).to_contain_text('⇢ 420["whoami",null]   (Engine.IO message · Socket.IO EVENT)')
    expect(tab.log).to_contain_text("⇠ 430[{")
    expect(tab.log).to_contain_text("(Engine.IO message · Socket.IO ACK)")


def test_a_bad_token_shows_the_unauthorized_reason(dev_server, open_tester):
    tab = open_tester(dev_server.url)
    tab.client.locator(".token").fill("not-a-jwt")
    tab.client.button("Connect").click()
    expect(tab.log).to_contain_text("CONNECTED: ")
    tab.send("whoami")
    expect(tab.ack("whoami")).to_contain_text('"error": "Unauthorized"')
    expect(tab.ack("whoami")).to_contain_text('"reason": "invalid token"')


def test_a_refused_connection_shows_connect_error_with_its_reason(start_server, open_tester):
    server = start_server(env={"REQUIRE_AUTH": "1", "JWT_SECRET": None})
    tab = open_tester(server.url)
    tab.client.button("Connect").click()
    expect(tab.log).to_contain_text("connect_error: Unauthorized")
    expect(tab.log).to_contain_text('"reason": "no token"')
    expect(tab.client.status).to_have_text("refused: Unauthorized")


def test_invalid_json_is_caught_in_place_and_nothing_is_sent(dev_server, open_tester):
    tab = open_tester(dev_server.url)
    tab.connect_as("demo user")
    tab.card("message").locator("textarea").fill('{"room": "lobby", text: oops}')
    tab.send("message")
    expect(tab.ack("message")).to_contain_text("Invalid JSON, nothing sent")
    expect(tab.card("message").locator("textarea")).to_be_focused()
    assert "→ message" not in tab.log.inner_text()


def test_ctrl_enter_in_a_payload_sends_it(dev_server, open_tester):
    tab = open_tester(dev_server.url)
    tab.connect_as("demo admin")
    tab.card("whoami").locator("textarea").press("Control+Enter")
    expect(tab.ack("whoami")).to_contain_text('"userId": "demo-admin"')


def test_a_dropped_server_shows_reconnect_attempts_and_the_page_recovers(start_server,
                                                                        open_tester, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    db = tmp_path / "kept.db"
    server = start_server(env={"JWT_SECRET": None}, args=("--port", str(port)), db=db)
    tab = open_tester(server.url)
    tab.connect_as("demo user")
    tab.send("joinRoom")
    expect(tab.client.locator(".rooms")).to_have_text("lobby")
    first_id = tab.socket_id()
    server.stop()
    expect(tab.log).to_contain_text("DISCONNECTED: transport close")
    expect(tab.log).to_contain_text("reconnect attempt 1")
    expect(tab.client.status).to_have_text("reconnecting…")
    start_server(env={"JWT_SECRET": None}, args=("--port", str(port)), db=db)
    expect(tab.log).to_contain_text("reconnected after", timeout=15_000)
    expect(tab.client.status).to_contain_text("connected ·")
    assert tab.socket_id() != first_id
    tab.send("whoami")
    expect(tab.ack("whoami")).to_contain_text('"userId": "demo-user"')
    # The new socket is in the room again: the page rejoined it, and the server agrees.
    expect(tab.log).to_contain_text("rejoined room lobby after reconnecting")
    expect(tab.client.locator(".rooms")).to_have_text("lobby")
    tab.send("message")
    expect(tab.ack("message")).to_contain_text('"sentTo": "room:lobby"')


def test_filter_pause_clear_and_copy(dev_server, open_tester):
    tab = open_tester(dev_server.url)
    tab.context.grant_permissions(["clipboard-read", "clipboard-write"])
    tab.connect_as("demo user")
    tab.send("whoami")
    expect(tab.log).to_contain_text("↩ ack whoami")
    tab.page.get_by_placeholder("filter…").fill("ack whoami")
    expect(tab.log.locator("li:visible")).to_have_count(1)
    tab.page.get_by_placeholder("filter…").fill("")
    tab.page.get_by_role("button", name="Pause").click()
    tab.send("joinRoom")
    expect(tab.page.get_by_role("button", name="Resume (2)")).to_be_visible()
    assert "joinRoom" not in tab.log.inner_text()
    tab.page.get_by_role("button", name="Resume (2)").click()
    expect(tab.log).to_contain_text("↩ ack joinRoom")
    tab.page.get_by_role("button", name="Copy").click()
    expect(tab.log).to_contain_text("copied")
    assert "↩ ack joinRoom" in tab.page.evaluate("navigator.clipboard.readText()")
    tab.page.get_by_role("button", name="Clear").click()
    expect(tab.log.locator("li")).to_have_count(0)


def test_demo_tokens_are_off_once_jwt_secret_is_set(server, open_tester):
    tab = open_tester(server.url)
    expect(tab.client.locator(".identity-hint")).to_contain_text("dev tokens are off")
    tab.client.button("demo user").click()
    expect(tab.client.locator(".identity-hint")).to_contain_text("JWT_SECRET")
    expect(tab.client.locator(".token")).to_have_value("")
    # With no demo tokens, the step that stands out is pasting one.
    expect(tab.client.locator('.step[data-step="token"]')).to_have_attribute(
        "aria-current", "step")


def test_opened_from_disk_it_loads_the_pinned_cdn_build_checked_by_its_hash(dev_server, browser):
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # The CDN answers with the same pinned file npm installed; the page's
    # integrity hash must match it byte for byte or the browser refuses it.
    page.route(CDN, lambda route: route.fulfill(
        body=CLIENT_SCRIPT.read_bytes(), content_type="application/javascript",
        headers={"Access-Control-Allow-Origin": "*"}))
    page.goto((SERVER.parent / "ws-tester.html").as_uri())
    page.wait_for_function("window.testerReady === true")
    client = Client(page)
    expect(client.log).to_contain_text("socket.io-client loaded from the CDN")
    client.locator(".url-input").fill(dev_server.url)
    # From disk the demo buttons cannot get a token (the server serves them to
    # its own pages only): the page says so, and a token from the banner works.
    client.button("demo admin").click()
    expect(client.locator(".identity-hint")).to_contain_text(
        f"demo tokens need the page the server serves: open {dev_server.url}/")
    banner_token = re.search(r"demo admin: (Bearer \S+)", dev_server.stdout())[1]
    client.locator(".token").fill(banner_token)
    client.button("Connect").click()
    expect(client.log).to_contain_text("CONNECTED: ")
    assert errors == []
    context.close()


STEAL_A_TOKEN = """async (server) => {
  const seen = {};
  try {
    const response = await fetch(server + "/dev/token?user=mallory&role=admin");
    seen.read = await response.text();
  } catch (error) { seen.refused = String(error); }
  try {  // no-cors: the request goes out, the answer stays opaque (or is blocked)
    const opaque = await fetch(server + "/dev/token?user=mallory&role=admin", {mode: "no-cors"});
    seen.opaque = await opaque.text();
  } catch (error) { seen.opaque = String(error); }
  seen.products = (await (await fetch(server + "/api/products")).json()).length;
  return seen;
}"""


class AnotherSite(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<!doctype html><title>another site</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def another_site():
    """A web page of another origin, served on loopback like any site would be."""
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AnotherSite)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    site.server_close()


def test_a_page_of_another_origin_cannot_read_a_dev_token(dev_server, browser, another_site):
    other_origin = another_site
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{other_origin}/page.html")
    seen = page.evaluate(STEAL_A_TOKEN, dev_server.url)
    context.close()
    assert "read" not in seen and "Failed to fetch" in seen["refused"]
    assert "Bearer" not in seen["opaque"]
    # The positive control: the same page reads the public catalogue cross-origin.
    assert seen["products"] == 4
    assert f"dev tokens are for this server's own pages, not for {other_origin}" in \
        dev_server.stderr()


def test_a_rebound_host_name_cannot_get_a_dev_token(start_server, browser):
    """A DNS-rebinding page: evil.example resolves to this machine, so the page
    is same-origin with the server as far as the browser knows."""
    refused = start_server(env={"JWT_SECRET": None})
    listed = start_server(env={"JWT_SECRET": None, "ALLOWED_HOSTS": "evil.example"})
    rebinding = browser.browser_type.launch(executable_path=CHROMIUM, args=[
        *CHROMIUM_FLAGS, "--host-resolver-rules=MAP evil.example 127.0.0.1"])
    try:
        for server, allowed in [(refused, False), (listed, True)]:
            port = server.url.rsplit(":", 1)[1]
            tab = PageTab(rebinding, f"http://evil.example:{port}/")
            tab.client.button("demo admin").click()
            if allowed:  # the positive control: a listed name is served
                expect(tab.client.locator(".token")).to_have_value(re.compile("^Bearer "))
            else:
                expect(tab.client.locator(".identity-hint")).to_contain_text("ALLOWED_HOSTS")
                expect(tab.client.locator(".token")).to_have_value("")
            tab.close()
    finally:
        rebinding.close()


def test_the_page_fits_a_phone_screen(dev_server, open_tester, tmp_path):
    tab = open_tester(dev_server.url, viewport={"width": 390, "height": 844})
    tab.connect_as("demo user")
    assert no_sideways_scroll(tab.page)
    tab.page.screenshot(path=tmp_path / "tester-phone.png", full_page=True)
    assert tab.console_errors == []


def test_the_admin_ui_is_served_locally_behind_its_credentials(start_server, open_tester):
    server = start_server(env={"ADMIN_UI": "teacher:s3cret"})
    assert server.get("/admin-ui/")[0] == 401
    host, port = server.url.removeprefix("http://").split(":")
    for credentials, status in [("teacher:s3cret", 200), ("teacher:guess", 401)]:
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        auth = base64.b64encode(credentials.encode()).decode()
        connection.request("GET", "/admin-ui/", headers={"Authorization": f"Basic {auth}"})
        response = connection.getresponse()
        assert response.status == status
        if status == 200:
            assert "Socket.IO Admin UI" in response.read().decode()
        connection.close()
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    auth = base64.b64encode(b"teacher:s3cret").decode()
    connection.request("GET", "/admin-ui/../../../server.py",
                       headers={"Authorization": f"Basic {auth}"})
    assert connection.getresponse().status == 404
    tab = open_tester(server.url)
    expect(tab.page.get_by_role("link", name="Admin UI")).to_have_attribute("href", "/admin-ui/")


def test_the_admin_ui_logs_in_offline_with_the_same_credentials(start_server, browser):
    server = start_server(env={"ADMIN_UI": "teacher:s3cret"})
    context = browser.new_context(http_credentials={"username": "teacher", "password": "s3cret"})
    page = context.new_page()
    page.route("https://**", lambda route: route.abort())
    page.goto(server.url + "/admin-ui/")
    page.get_by_label("Server URL").fill(server.url)
    page.get_by_label("Username").fill("teacher")
    page.get_by_label("Password").fill("s3cret")
    page.get_by_role("button", name="Connect").click()
    expect(page.locator("header")).to_contain_text("Status: connected")
    context.close()


def test_the_admin_ui_is_absent_without_admin_ui(server, open_tester):
    assert server.get("/admin-ui/")[0] == 404
    tab = open_tester(server.url)
    expect(tab.page.get_by_role("link", name="Admin UI")).to_be_hidden()


# -- a workshop day: offline from pip alone, on a laptop and a phone ------------

def test_the_shipped_client_is_the_pinned_build_byte_for_byte():
    pinned = json.loads((SERVER.parent / "package.json").read_text())["dependencies"][
        "socket.io-client"]
    shipped = (SERVER.parent / "vendor" / "socket.io.min.js").read_bytes()
    assert CLIENT_SCRIPT.exists(), "run npm ci: the test compares with the npm build"
    assert json.loads((CLIENT_SCRIPT.parent.parent / "package.json").read_text())[
        "version"] == pinned
    assert shipped == CLIENT_SCRIPT.read_bytes()
    assert shipped.startswith(f"/*!\n * Socket.IO v{pinned}\n".encode())
    assert b"Released under the MIT License." in shipped[:200]
    page = (SERVER.parent / "ws-tester.html").read_text()
    integrity = "sha384-" + base64.b64encode(hashlib.sha384(shipped).digest()).decode()
    assert f"socket.io-client@{pinned}/dist/socket.io.min.js" in page and integrity in page


def checkout_without_npm(tmp_path) -> Path:
    """What pip alone leaves: the project's files, no node_modules."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("server.py", "adapters.py", "schema.sql", "ws-tester.html", "asyncapi.json",
                 "openapi.json"):
        shutil.copy(SERVER.parent / name, checkout / name)
    shutil.copytree(SERVER.parent / "vendor", checkout / "vendor")
    return checkout


def loopback_only(context) -> list[str]:
    """Every request off this machine fails, as on a workshop laptop offline."""
    blocked = []

    def route(route):
        host = urllib.parse.urlsplit(route.request.url).hostname
        if route.request.url.startswith("file:") or host in ("127.0.0.1", "localhost", "::1"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()
    context.route("**/*", route)
    return blocked


def test_a_checkout_without_npm_serves_a_tester_that_works_offline(start_server, browser,
                                                                  tmp_path):
    checkout = checkout_without_npm(tmp_path)
    server = start_server(env={"JWT_SECRET": None}, script=checkout / "server.py")
    context = browser.new_context()
    blocked = loopback_only(context)
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("window.testerReady === true")
    Client(page).connect_as("demo user")
    Client(page).send("whoami")
    expect(Client(page).ack("whoami")).to_contain_text('"userId": "demo-user"')
    context.close()
    assert blocked == []   # it never even tried the CDN


def test_opened_from_disk_it_loads_the_client_from_the_typed_server_first(start_server, browser,
                                                                         tmp_path):
    checkout = checkout_without_npm(tmp_path)
    server = start_server(env={"JWT_SECRET": None}, script=checkout / "server.py")
    context = browser.new_context()
    loopback_only(context)
    page = context.new_page()
    page.goto((checkout / "ws-tester.html").as_uri())
    page.wait_for_function("window.testerReady === true")
    client = Client(page)
    client.locator(".url-input").fill(server.url)
    client.locator(".token").fill(re.search(r"demo user : (Bearer \S+)", server.stdout())[1])
    client.button("Connect").click()
    expect(client.log).to_contain_text(f"socket.io-client loaded from the server at {server.url}")
    expect(client.status).to_contain_text("connected ·")
    context.close()


def test_without_any_client_script_the_page_says_so_plainly(browser, tmp_path):
    context = browser.new_context()
    loopback_only(context)
    page = context.new_page()
    page.goto((checkout_without_npm(tmp_path) / "ws-tester.html").as_uri())
    page.wait_for_function("window.testerReady === true")
    client = Client(page)
    client.locator(".url-input").fill(f"http://127.0.0.1:{free_port()}")   # nothing listens
    client.button("Connect").click()
    expect(client.status).to_have_text("no Socket.IO client")
    client.send("whoami")
    ack = client.ack("whoami")
    expect(ack).to_contain_text("Nothing can be sent: the Socket.IO client script could not be"
                                " loaded")
    expect(ack).not_to_contain_text("press Connect first")
    context.close()


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 900},
                                      {"width": 390, "height": 844}], ids=["laptop", "phone"])
def test_the_connection_bar_reads_in_the_order_it_is_used(dev_server, open_tester, tmp_path,
                                                          viewport):
    tab = open_tester(dev_server.url, viewport=viewport)
    page, client = tab.page, tab.client
    box = {name: client.locator(selector).bounding_box() for name, selector in {
        "identity": ".identities", "token": ".token", "url": ".url-input",
        "transport": ".transport-select", "connect": "button.connect",
        "disconnect": "button.disconnect", "drop": "button.drop"}.items()}
    assert box["identity"]["y"] < box["token"]["y"] < box["url"]["y"]      # who, then where,
    assert box["token"]["y"] + box["token"]["height"] < box["connect"]["y"]  # then Connect
    assert box["disconnect"]["y"] == box["drop"]["y"]      # the ways out side by side, on top
    for name, b in box.items():                                     # nothing off the screen
        assert 0 <= b["x"] and b["x"] + b["width"] <= viewport["width"], name
    # The transport select shows its whole option.
    fit = page.evaluate("""() => {  // text and arrow, against the width the select has
        const select = document.querySelector('.client .transport-select');
        const canvas = document.createElement('canvas').getContext('2d');
        canvas.font = getComputedStyle(select).font;
        return [canvas.measureText(select.selectedOptions[0].text).width + 24, select.clientWidth];
    }""")
    assert fit[0] <= fit[1], fit
    page.screenshot(path=tmp_path / f"tester-{viewport['width']}.png", full_page=False)
    tab.connect_as("demo user")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    status = client.status.bounding_box()
    assert 0 <= status["y"] < viewport["height"]                    # the status stays in view
    if viewport["width"] < 720:                                     # the log is one tap away
        client.root.get_by_role("link", name="Log ↓").click()
        expect(client.locator(".log-title")).to_be_in_viewport()
    page.screenshot(path=tmp_path / f"tester-{viewport['width']}-scrolled.png")
    assert no_sideways_scroll(page)
    assert tab.console_errors == []


def test_the_next_step_is_the_one_that_stands_out(dev_server, open_tester):
    tab = open_tester(dev_server.url)
    client = tab.client
    accent = "rgb(36, 86, 211)"

    def background(name):
        return client.button(name).evaluate("b => getComputedStyle(b).backgroundColor")

    def current():
        return client.locator('.step[aria-current="step"]')

    # First: who. The demo identities are the loud buttons; Connect and Send are quiet.
    expect(current()).to_have_attribute("data-step", "identity")
    expect(current().locator(".step-no")).to_have_text("1")
    assert background("demo user") == accent and background("demo admin") == accent
    assert background("Connect") != accent
    send = client.card("whoami").get_by_role("button", name="Send")
    assert send.evaluate("b => getComputedStyle(b).backgroundColor") != accent
    client.send("whoami")                                  # sending now says what to do
    expect(client.ack("whoami")).to_have_text("Not connected: press Connect first.")
    # A token: steps 1 and 2 are done, Connect is what to press.
    client.button("demo user").click()
    expect(current()).to_have_attribute("data-step", "connect")
    expect(client.locator('.step[data-step="identity"] .step-no')).to_have_text("✓")
    assert background("Connect") == accent and background("demo user") != accent
    # Connected: the steps fold into one line, and Send is the loud button.
    client.button("Connect").click()
    expect(client.status).to_contain_text("connected ·")
    host = dev_server.url.removeprefix("http://")
    expect(client.locator(".steps-summary")).to_have_text(
        f"✓ demo-user → ✓ token → ✓ {host} · websocket")
    expect(client.button("Connect")).to_be_hidden()
    expect(send).to_have_css("background-color", accent)
    client.button("Disconnect").click()                    # a clean disconnect opens them
    expect(client.button("Connect")).to_be_visible()
    expect(current()).to_have_attribute("data-step", "connect")


def test_an_ack_cut_off_by_the_server_closing_shows_the_close_and_its_reason(start_server,
                                                                            open_tester):
    server = start_server(env={"JWT_SECRET": None, "MAX_PAYLOAD_BYTES": "2000"})
    tab = open_tester(server.url)
    tab.connect_as("demo user")
    tab.card("message").locator("textarea").fill(json.dumps({"room": "lobby", "text": "x" * 5000}))
    tab.send("message")
    expect(tab.ack("message")).to_contain_text(
        "the connection closed before the ack: transport close (websocket close 1009: Incoming"
        " frame of")
    expect(tab.ack("message")).not_to_contain_text("no ack within")


# -- the contract: asyncapi.json drives the page ---------------------------------

CONTRACT_DOCUMENT = json.loads((SERVER.parent / "asyncapi.json").read_text())


def test_the_cards_and_server_events_come_from_the_servers_asyncapi_document(dev_server,
                                                                            open_tester):
    tab = open_tester(dev_server.url)
    operations = CONTRACT_DOCUMENT["operations"]
    expect(tab.page.locator("#contract-source")).to_contain_text(
        f"Events and cards come from {dev_server.url}/asyncapi.json")
    expect(tab.card("joinRoom").locator("p.hint")).to_have_text(operations["joinRoom"]["summary"])
    expect(tab.card("order:create").locator("p.hint")).to_have_text(
        operations["orderCreate"]["summary"])
    assert tab.page.locator("#server-events li").all_inner_texts() == [
        "presence:update", "joined", "left", "message", "notification:received", "order:created",
        "order:updated", "product:stockUpdated", "typing", "sync"]
    assert tab.console_errors == []


def test_without_a_contract_the_page_keeps_its_built_in_cards(dev_server, browser):
    context = browser.new_context()
    page = context.new_page()
    page.route("**/asyncapi.json", lambda route: route.fulfill(status=404, body="{}"))
    page.goto(dev_server.url + "/")
    page.wait_for_function("window.testerReady === true")
    expect(page.locator("#contract-source")).to_contain_text("This server has no asyncapi.json")
    expect(page.locator('form[data-event="joinRoom"] p.hint')).to_have_text(
        "Join a room: a name, or { room }. Anyone.")
    context.close()


THE_ORIGINAL_SEQUENCE = [
    "whoami", "joinRoom lobby", "message to lobby", "order:create (the 350 example)",
    "order:updateStatus to paid", "notification:send to itself", "typing to itself",
    "error: price missing", "error: a bad ObjectId", "error: an unknown event"]
CATCH_UP = [
    "catch-up: GET /api/orders gives the state and its offset",
    "catch-up: connect with auth.serverOffset, then sync",
    "catch-up: drop the connection (the transport is cut)",
    "catch-up: while it is away, an order, its payment, a message and a notification",
    "catch-up: reconnect with the offset: exactly the missed events, in order, once",
    "catch-up: sync after them, with their count",
    "catch-up: joinRoom with since replays the room's missed message"]
CHECK_STEPS = THE_ORIGINAL_SEQUENCE + CATCH_UP


def test_check_this_server_passes_every_step_here(dev_server, open_tester):
    tab = open_tester(dev_server.url)
    tab.connect_as("demo user")
    tab.page.get_by_role("button", name="Check this server").click()
    steps = tab.page.locator("#check-results li")
    expect(steps).to_have_count(len(CHECK_STEPS), timeout=40_000)
    expect(tab.page.locator('#check-results li[data-ok="false"]')).to_have_count(0)
    assert steps.all_inner_texts() == CHECK_STEPS
    expect(tab.log).to_contain_text(
        f"check this server: {len(CHECK_STEPS)} of {len(CHECK_STEPS)} steps as the contract says")


def test_check_this_server_pinpoints_the_step_where_a_server_departs(start_server, open_tester,
                                                                    tmp_path):
    """A backend of the protocol that answers typing wrongly."""
    departing = tmp_path / "departing.py"
    departing.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(SERVER.parent)!r})\n"
        "import eventlet\n"
        "eventlet.monkey_patch()\n"
        "import server\n"
        "_, user_required = server.EVENTS['typing']\n"
        "server.EVENTS['typing'] = (lambda ctx, data: {'ok': 'yes', 'mode': 'personal'},"
        " user_required)\n"
        "sys.exit(server.main())\n")
    server = start_server(env={"JWT_SECRET": None}, script=departing)
    tab = open_tester(server.url)
    tab.connect_as("demo user")
    tab.page.get_by_role("button", name="Check this server").click()
    expect(tab.page.locator("#check-results li")).to_have_count(len(CHECK_STEPS),
                                                                 timeout=40_000)
    failed = tab.page.locator('#check-results li[data-ok="false"]')
    expect(failed).to_have_count(1)
    expect(failed).to_contain_text("typing to itself")
    expect(failed.locator("pre")).to_contain_text('payload.ok: "yes" is not true')
    tab.page.screenshot(path=tmp_path / "check-this-server.png", full_page=True)


# -- several clients in one page: the presenter's scene --------------------------

def two_clients(tab):
    """A shopper (#1, demo user) and an admin (#2, demo admin), both connected."""
    user = tab.client
    user.connect_as("demo user")
    admin = tab.add_client()
    admin.connect_as("demo admin")
    return user, admin


def order_id_in(ack) -> str:
    return re.search(r'"_id": "([0-9a-f]{24})"', ack.inner_text())[1]


def test_two_clients_in_one_page_the_user_orders_the_admin_pays_both_see_it(
        dev_server, open_tester, tmp_path):
    tab = open_tester(dev_server.url, viewport={"width": 1280, "height": 800})
    user, admin = two_clients(tab)
    # Each clearly labelled: who, socket id, transport, connected; side by side.
    expect(user.locator(".client-name")).to_have_text("#1demo-user")
    expect(admin.locator(".client-name")).to_have_text("#2demo-admin (admin)")
    expect(user.status).to_have_text(f"connected · {user.socket_id()} · websocket")
    expect(admin.status).to_have_text(f"connected · {admin.socket_id()} · websocket")
    left, right = user.root.bounding_box(), admin.root.bounding_box()
    assert left["y"] == right["y"] and left["x"] + left["width"] <= right["x"]
    assert right["x"] + right["width"] <= 1280
    for client in (user, admin):          # one card of each event per client, no ambiguity
        assert client.card("order:updateStatus").count() == 1
    assert tab.page.locator('form[data-event="order:updateStatus"]').count() == 2

    user.send("order:create")
    expect(user.ack("order:create")).to_contain_text('"status": "pending"')
    order_id = order_id_in(user.ack("order:create"))
    expect(admin.log).to_contain_text("← order:created")
    expect(admin.card("order:updateStatus").locator("textarea")).to_have_value(
        re.compile(order_id))
    admin.card("order:updateStatus").get_by_role(
        "button", name="order:updateStatus to paid").click()
    expect(admin.ack("order:updateStatus")).to_contain_text('"status": "paid"')
    for client in (user, admin):
        expect(client.log).to_contain_text("← order:updated")
        expect(client.log).to_contain_text("← product:stockUpdated")
        expect(client.stock(TSHIRT)).to_have_text(str(dev_server.stock(TSHIRT)))
        expect(client.stock(MUG)).to_have_text(str(dev_server.stock(MUG)))
        expect(client.locator(f'.orders li[data-order="{order_id}"]')).to_contain_text("paid")
    assert dev_server.stock(TSHIRT) == 48
    # The user's log: what it sent and got; the admin's: what it sent. Never mixed.
    assert "→ order:create" in user.log.inner_text()
    assert "→ order:create" not in admin.log.inner_text()
    assert "→ order:updateStatus" in admin.log.inner_text()
    assert no_sideways_scroll(tab.page)
    tab.page.evaluate("window.scrollTo(0, 0)")
    tab.page.screenshot(path=tmp_path / "two-clients-1280x800.png")
    assert tab.console_errors == []


def test_drop_connection_holds_the_client_offline_and_reconnect_catches_up(
        dev_server, open_tester, tmp_path):
    tab = open_tester(dev_server.url, viewport={"width": 1280, "height": 800})
    user, admin = two_clients(tab)
    for client in (user, admin):
        client.send("joinRoom")
        expect(client.ack("joinRoom")).to_contain_text('"ok": true')
    user.send("order:create")
    expect(user.ack("order:create")).to_contain_text('"status": "pending"')
    order_id = order_id_in(user.ack("order:create"))
    expect(admin.card("order:updateStatus").locator("textarea")).to_have_value(
        re.compile(order_id))
    # Every durable event shows its offset; the client keeps the greatest.
    created = user.log.locator("li", has_text="← order:created")
    expect(created.locator(".offset-badge")).to_be_visible()
    offset_before = user.evaluate("c => c.serverOffset")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9]{16}", offset_before)

    user.button("Drop connection").click()
    expect(user.status).to_have_text("offline · dropped — press Reconnect")
    expect(admin.locator(".online")).not_to_contain_text("demo-user")   # the server saw it
    expect(user.locator(".rooms")).to_have_text("lobby (offline)")
    user.send("whoami")
    expect(user.ack("whoami")).to_have_text(
        "Not connected: the connection was dropped, press Reconnect first.")

    # While the shopper is away the admin pays the order and says so in the lobby.
    admin.card("order:updateStatus").get_by_role(
        "button", name="order:updateStatus to paid").click()
    expect(admin.ack("order:updateStatus")).to_contain_text('"status": "paid"')
    admin.card("message").locator("textarea").fill(
        json.dumps({"room": "lobby", "text": "paid while you were away"}))
    admin.send("message")
    expect(admin.log).to_contain_text('"text": "paid while you were away"')
    expect(admin.stock(TSHIRT)).to_have_text("48")
    # Still offline: socket.io-client is told not to come back by itself, and it has not.
    assert user.evaluate("c => c.socket.io.reconnection()") is False
    expect(user.status).to_have_text("offline · dropped — press Reconnect")
    expect(admin.locator(".online")).not_to_contain_text("demo-user")
    assert "← order:updated" not in user.log.inner_text()
    expect(user.stock(TSHIRT)).to_have_text("50")           # the stale view, until...

    user.button("Reconnect").click()
    expect(user.status).to_contain_text("connected ·")
    expect(user.log).to_contain_text("caught up: 3 missed events replayed")
    replayed = user.log.locator("li.replayed")
    expect(replayed.filter(has_text="← order:updated")).to_have_count(1)
    expect(replayed.filter(has_text="← product:stockUpdated")).to_have_count(2)
    expect(user.log).to_contain_text(
        "rejoined room lobby after reconnecting (since offset")
    expect(replayed.filter(has_text="paid while you were away")).to_have_count(1)
    expect(user.stock(TSHIRT)).to_have_text("48")
    expect(user.locator(f'.orders li[data-order="{order_id}"]')).to_contain_text("paid")
    # Nothing twice: every offset this client logged, once: order:created live, then
    # order:updated and two stock updates at the catch-up, and the lobby message.
    offsets = [e["offset"] for e in user.entries() if e.get("offset")]
    assert len(offsets) == len(set(offsets)) == 5, offsets
    # The handshake after the drop carried the offset kept before it.
    entries = user.entries()
    assert any(f"catching up from offset {int(offset_before[-16:])}" in e["text"]
               for e in entries), [e["text"] for e in entries]
    assert user.evaluate("c => c.serverOffset") > offset_before
    # A live event after the catch-up is not marked replayed.
    admin.card("message").locator("textarea").fill(
        json.dumps({"room": "lobby", "text": "and now live"}))
    admin.send("message")
    expect(user.log.locator("li", has_text='"text": "and now live"')).to_have_count(1)
    expect(user.log.locator("li.replayed", has_text='"text": "and now live"')).to_have_count(0)
    tab.page.evaluate("window.scrollTo(0, 0)")
    tab.page.screenshot(path=tmp_path / "caught-up-1280x800.png")
    assert tab.console_errors == []


def test_on_a_phone_the_clients_are_tabs(dev_server, open_tester, tmp_path):
    tab = open_tester(dev_server.url, viewport={"width": 390, "height": 844})
    page = tab.page
    # "Check this server" is on the first screen, not at the bottom of the page.
    check = page.get_by_role("button", name="Check this server").bounding_box()
    assert check["y"] + check["height"] <= 844
    user, admin = two_clients(tab)
    tabs = page.get_by_role("tab")
    expect(tabs).to_have_count(2)
    expect(tabs.nth(1)).to_have_attribute("aria-selected", "true")
    expect(admin.root).to_be_visible()
    expect(user.root).to_be_hidden()
    page.get_by_role("tab", name=re.compile("^#1 demo-user")).click()
    expect(user.root).to_be_visible()
    expect(admin.root).to_be_hidden()
    user.send("order:create")
    expect(user.ack("order:create")).to_contain_text('"status": "pending"')
    page.get_by_role("tab", name=re.compile("^#2 demo-admin")).click()
    admin.card("order:updateStatus").get_by_role(
        "button", name="order:updateStatus to paid").click()
    expect(admin.ack("order:updateStatus")).to_contain_text('"status": "paid"')
    expect(admin.stock(TSHIRT)).to_have_text("48")
    page.get_by_role("tab", name=re.compile("^#1 demo-user")).click()
    expect(user.stock(TSHIRT)).to_have_text("48")
    assert no_sideways_scroll(page)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=tmp_path / "two-clients-390x844.png")
    page.get_by_role("button", name="Check this server").click()
    expect(page.locator("#check-results li")).to_have_count(len(CHECK_STEPS), timeout=40_000)
    expect(page.locator('#check-results li[data-ok="false"]')).to_have_count(0)
    expect(page.locator("#check-title")).to_be_in_viewport()
    assert no_sideways_scroll(page)
    page.screenshot(path=tmp_path / "check-390x844.png")
    assert tab.console_errors == []


@pytest.mark.parametrize("width", [1280, 1024, 390])
def test_no_sideways_scroll_with_two_clients_and_every_panel_open(dev_server, open_tester,
                                                                   tmp_path, width):
    tab = open_tester(dev_server.url, viewport={"width": width, "height": 800})
    assert no_sideways_scroll(tab.page)                  # one client, nothing connected
    user, _ = two_clients(tab)
    if width < 720:
        tab.page.get_by_role("tab", name=re.compile("^#1")).click()
    user.locator(".verbose").check()
    user.send("whoami")
    expect(user.log).to_contain_text("Socket.IO ACK")
    tab.page.get_by_role("button", name="Check this server").click()
    expect(tab.page.locator("#check-results li")).to_have_count(len(CHECK_STEPS),
                                                                timeout=40_000)
    with tab.page.expect_download() as download:
        tab.page.get_by_role("button", name="Export log").click()
    saved = tmp_path / "log.json"
    download.value.save_as(saved)
    with tab.page.expect_file_chooser() as chooser:
        tab.page.get_by_role("button", name="Open log file").click()
    chooser.value.set_files(saved)
    expect(tab.page.locator("#log-file")).to_be_visible()
    expect(tab.page.locator("#contract-source")).to_contain_text(dev_server.url)
    assert no_sideways_scroll(tab.page)


# -- keep what you did -----------------------------------------------------------

def test_an_edited_payload_survives_a_reload_for_every_client_until_reset(dev_server,
                                                                          open_tester):
    tab = open_tester(dev_server.url)
    page = tab.page
    example = tab.card("message").locator("textarea").input_value()
    assert '"Hello!"' in example
    edited = json.dumps({"room": "lobby", "text": "kept across a reload"}, indent=2)
    tab.card("message").locator("textarea").fill(edited)
    expect(tab.card("message").locator(".edited")).to_be_visible()
    page.reload()
    page.wait_for_function("window.testerReady === true")
    expect(tab.card("message").locator("textarea")).to_have_value(edited)
    expect(tab.card("message").locator(".edited")).to_be_visible()
    expect(tab.card("whoami").locator(".edited")).to_be_hidden()     # per event
    second = tab.add_client()                                         # shared by the clients
    expect(second.card("message").locator("textarea")).to_have_value(edited)
    # The edit is what gets sent.
    tab.connect_as("demo user")
    tab.send("joinRoom")
    expect(tab.ack("joinRoom")).to_contain_text('"ok": true')
    tab.send("message")
    expect(tab.log).to_contain_text('"text": "kept across a reload"')
    # The way back: the contract's example, for good.
    tab.card("message").get_by_role("button", name="↺ example").click()
    expect(tab.card("message").locator("textarea")).to_have_value(example)
    expect(tab.card("message").locator(".edited")).to_be_hidden()
    page.reload()
    page.wait_for_function("window.testerReady === true")
    expect(tab.card("message").locator("textarea")).to_have_value(example)
    assert tab.console_errors == []


def test_the_log_exports_to_json_and_opens_back_read_only(dev_server, open_tester, tmp_path):
    tab = open_tester(dev_server.url)
    page = tab.page
    user = tab.client
    user.locator(".verbose").check()              # the raw CONNECT packet carries the token
    user.connect_as("demo user")
    user.send("whoami")
    expect(user.ack("whoami")).to_contain_text('"userId": "demo-user"')
    admin = tab.add_client()
    admin.connect_as("demo admin")
    user.send("order:create")
    expect(admin.log).to_contain_text("← order:created")
    tokens = [client.locator(".token").input_value().split()[1] for client in (user, admin)]

    with page.expect_download() as download:
        page.get_by_role("button", name="Export log").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name.startswith("shop-realtime-log-") and saved.suffix == ".json"
    text = saved.read_text()
    assert not any(token in text for token in tokens) and "eyJ" not in text   # never a token
    exported = json.loads(text)
    entries = exported["entries"]
    assert exported["clients"] == ["#1 demo-user", "#2 demo-admin (admin)"]
    for entry in entries:
        assert {"time", "client", "direction", "event", "payload", "ack"} <= entry.keys()
    # Each entry names its client as it was then (#1 was anonymous until its token).
    assert {e["client"] for e in entries} == {"#1 anonymous", "#1 demo-user",
                                              "#2 demo-admin (admin)"}
    whoami = next(e for e in entries if e["direction"] == "out" and e["event"] == "whoami")
    assert whoami["client"] == "#1 demo-user" and whoami["payload"] is None
    assert whoami["ack"]["userId"] == "demo-user"
    created = next(e for e in entries if e["client"] == "#2 demo-admin (admin)"
                   and e["direction"] == "in" and e["event"] == "order:created")
    assert created["payload"]["order"]["total"] == 350 and created["offset"]
    assert any("CONNECT" in e["text"] and "token hidden" in e["text"] for e in entries)
    assert len(entries) == len(user.entries()) + len(admin.entries())

    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Open log file").click()
    chooser.value.set_files(saved)
    view = page.locator("#log-file")
    expect(view).to_be_visible()
    expect(view.locator("#log-file-about")).to_contain_text(
        f"{saved.name} · {len(entries)} entries")
    lines = view.locator("#log-file-entries > li")
    expect(lines).to_have_count(len(entries))
    for n in (0, entries.index(whoami), entries.index(created), len(entries) - 1):
        expect(lines.nth(n).locator(".client-tag")).to_have_text(entries[n]["client"])
        expect(lines.nth(n).locator(".label")).to_have_text(entries[n]["text"])
    expect(lines.nth(entries.index(created)).locator(".offset-badge")).to_be_visible()
    # Read-only: nothing to edit or send in it.
    assert view.locator("textarea, input, select").count() == 0
    expect(view.get_by_role("button")).to_have_count(1)                    # Close
    view.get_by_role("button", name="Close").click()
    expect(view).to_be_hidden()
    assert tab.console_errors == []


# -- Never miss an update, checked against a server without it -------------------

def without_never_miss(tmp_path) -> Path:
    """This project before section 9 of the protocol, checked out beside it."""
    checkout = tmp_path / "before-never-miss"
    checkout.mkdir()
    archive = subprocess.run(["git", "-C", str(SERVER.parent), "archive", "8f40587"],
                             capture_output=True, check=True, timeout=60).stdout
    archive_file = tmp_path / "before-never-miss.tar"
    archive_file.write_bytes(archive)
    with tarfile.open(archive_file) as tar:
        tar.extractall(checkout, filter="data")
    return checkout / "server.py"


def test_check_this_server_is_red_on_the_catch_up_of_a_server_without_it(start_server,
                                                                        browser, tmp_path):
    old = start_server(script=without_never_miss(tmp_path))
    assert old.get("/api/orders")[0] == 404               # it really is the older server
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    # The page under test is this one, opened from disk and pointed at the older server.
    page.goto((SERVER.parent / "ws-tester.html").as_uri())
    page.wait_for_function("window.testerReady === true")
    client = Client(page)
    client.locator(".url-input").fill(old.url)
    client.locator(".token").fill(make_token("checker"))
    client.button("Connect").click()
    expect(client.status).to_contain_text("connected ·")
    expect(client.log).to_contain_text("this server gave no log offset")
    page.get_by_role("button", name="Check this server").click()
    steps = page.locator("#check-results li")
    expect(steps).to_have_count(len(CHECK_STEPS), timeout=60_000)
    names = [line.split("\n")[0] for line in steps.all_inner_texts()]
    assert names == CHECK_STEPS
    failed = page.locator('#check-results li[data-ok="false"]')
    failed_names = [line.split("\n")[0] for line in failed.all_inner_texts()]
    # The original sequence passes: it is a server of the protocol, without section 9.
    assert not set(failed_names) & set(THE_ORIGINAL_SEQUENCE), failed_names
    assert set(failed_names) >= {CATCH_UP[0], CATCH_UP[1], CATCH_UP[4], CATCH_UP[5],
                                 CATCH_UP[6]}, failed_names
    expect(failed.filter(has_text=CATCH_UP[1]).locator("pre")).to_contain_text("no sync within")
    expect(failed.filter(has_text=CATCH_UP[0]).locator("pre")).to_contain_text(
        "GET /api/orders")
    expect(client.log).to_contain_text(
        f"check this server: {len(CHECK_STEPS) - len(failed_names)} of {len(CHECK_STEPS)} steps")
    page.screenshot(path=tmp_path / "check-before-never-miss.png", full_page=True)
    context.close()
