"""ws-tester.html in real headless Chromium against a real server.py.

Chromium comes from the system (Debian's `chromium`; another path in $CHROMIUM)
and Playwright drives it. The machine has no internet: every test here is also a
test that the page works offline.
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
import threading
import urllib.parse
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import SERVER, free_port

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


class PageTab:
    """One tab of ws-tester.html, with every console error it logs."""

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
        self.log = self.page.locator("#log")

    def card(self, event: str):
        return self.page.locator(f'form[data-event="{event}"]')

    def send(self, event: str) -> None:
        self.card(event).get_by_role("button", name="Send").click()

    def ack(self, event: str):
        return self.card(event).locator(".ack")

    def connect_as(self, button: str) -> None:
        self.page.get_by_role("button", name=button, exact=True).click()
        expect(self.page.locator("#token")).to_have_value(re.compile("^Bearer "))
        self.page.get_by_role("button", name="Connect", exact=True).click()
        expect(self.page.locator("#status")).to_contain_text("connected ·")

    def socket_id(self) -> str:
        return self.page.evaluate("socket.id")

    def close(self) -> None:
        self.context.close()


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
    expect(user.page.locator("#online")).to_contain_text("demo-admin")

    user.send("joinRoom")
    expect(user.ack("joinRoom")).to_contain_text('"ok": true')
    expect(user.page.locator("#rooms")).to_contain_text("lobby")
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
    tab.page.locator("#token").fill("not-a-jwt")
    tab.page.get_by_role("button", name="Connect", exact=True).click()
    expect(tab.log).to_contain_text("CONNECTED: ")
    tab.send("whoami")
    expect(tab.ack("whoami")).to_contain_text('"error": "Unauthorized"')
    expect(tab.ack("whoami")).to_contain_text('"reason": "invalid token"')


def test_a_refused_connection_shows_connect_error_with_its_reason(start_server, open_tester):
    server = start_server(env={"REQUIRE_AUTH": "1", "JWT_SECRET": None})
    tab = open_tester(server.url)
    tab.page.get_by_role("button", name="Connect", exact=True).click()
    expect(tab.log).to_contain_text("connect_error: Unauthorized")
    expect(tab.log).to_contain_text('"reason": "no token"')
    expect(tab.page.locator("#status")).to_have_text("refused: Unauthorized")


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
    expect(tab.page.locator("#rooms")).to_have_text("lobby")
    first_id = tab.socket_id()
    server.stop()
    expect(tab.log).to_contain_text("DISCONNECTED: transport close")
    expect(tab.log).to_contain_text("reconnect attempt 1")
    expect(tab.page.locator("#status")).to_have_text("reconnecting…")
    start_server(env={"JWT_SECRET": None}, args=("--port", str(port)), db=db)
    expect(tab.log).to_contain_text("reconnected after", timeout=15_000)
    expect(tab.page.locator("#status")).to_contain_text("connected ·")
    assert tab.socket_id() != first_id
    tab.send("whoami")
    expect(tab.ack("whoami")).to_contain_text('"userId": "demo-user"')
    # The new socket is in the room again: the page rejoined it, and the server agrees.
    expect(tab.log).to_contain_text("rejoined room lobby after reconnecting")
    expect(tab.page.locator("#rooms")).to_have_text("lobby")
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
    expect(tab.page.locator("#identity-hint")).to_contain_text("dev tokens are off")
    tab.page.get_by_role("button", name="demo user").click()
    expect(tab.page.locator("#identity-hint")).to_contain_text("JWT_SECRET")
    expect(tab.page.locator("#token")).to_have_value("")


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
    expect(page.locator("#log")).to_contain_text("socket.io-client loaded from the CDN")
    page.locator("#url").fill(dev_server.url)
    # From disk the demo buttons cannot get a token (the server serves them to
    # its own pages only): the page says so, and a token from the banner works.
    page.get_by_role("button", name="demo admin").click()
    expect(page.locator("#identity-hint")).to_contain_text(
        f"demo tokens need the page the server serves: open {dev_server.url}/")
    banner_token = re.search(r"demo admin: (Bearer \S+)", dev_server.stdout())[1]
    page.locator("#token").fill(banner_token)
    page.get_by_role("button", name="Connect", exact=True).click()
    expect(page.locator("#log")).to_contain_text("CONNECTED: ")
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
            tab.page.get_by_role("button", name="demo admin").click()
            if allowed:  # the positive control: a listed name is served
                expect(tab.page.locator("#token")).to_have_value(re.compile("^Bearer "))
            else:
                expect(tab.page.locator("#identity-hint")).to_contain_text("ALLOWED_HOSTS")
                expect(tab.page.locator("#token")).to_have_value("")
            tab.close()
    finally:
        rebinding.close()


def test_the_page_fits_a_phone_screen(dev_server, open_tester, tmp_path):
    tab = open_tester(dev_server.url, viewport={"width": 390, "height": 844})
    tab.connect_as("demo user")
    assert tab.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
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
    page.get_by_role("button", name="demo user").click()
    page.get_by_role("button", name="Connect", exact=True).click()
    expect(page.locator("#status")).to_contain_text("connected ·")
    page.locator('form[data-event="whoami"]').get_by_role("button", name="Send").click()
    expect(page.locator('form[data-event="whoami"] .ack')).to_contain_text('"userId": "demo-user"')
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
    page.locator("#url").fill(server.url)
    page.locator("#token").fill(re.search(r"demo user : (Bearer \S+)", server.stdout())[1])
    page.get_by_role("button", name="Connect", exact=True).click()
    expect(page.locator("#log")).to_contain_text(
        f"socket.io-client loaded from the server at {server.url}")
    expect(page.locator("#status")).to_contain_text("connected ·")
    context.close()


def test_without_any_client_script_the_page_says_so_plainly(browser, tmp_path):
    context = browser.new_context()
    loopback_only(context)
    page = context.new_page()
    page.goto((checkout_without_npm(tmp_path) / "ws-tester.html").as_uri())
    page.wait_for_function("window.testerReady === true")
    page.locator("#url").fill(f"http://127.0.0.1:{free_port()}")   # nothing listens there
    page.get_by_role("button", name="Connect", exact=True).click()
    expect(page.locator("#status")).to_have_text("no Socket.IO client")
    page.locator('form[data-event="whoami"]').get_by_role("button", name="Send").click()
    ack = page.locator('form[data-event="whoami"] .ack')
    expect(ack).to_contain_text("Nothing can be sent: the Socket.IO client script could not be"
                                " loaded")
    expect(ack).not_to_contain_text("press Connect first")
    context.close()


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 900},
                                      {"width": 390, "height": 844}], ids=["laptop", "phone"])
def test_the_connection_bar_reads_in_the_order_it_is_used(dev_server, open_tester, tmp_path,
                                                          viewport):
    tab = open_tester(dev_server.url, viewport=viewport)
    page = tab.page
    box = {name: page.locator(selector).bounding_box() for name, selector in {
        "identity": "#identities", "token": "#token", "url": "#url", "transport": "#transport",
        "connect": "#connect", "disconnect": "#disconnect"}.items()}
    assert box["identity"]["y"] < box["token"]["y"] < box["url"]["y"]      # who, then where,
    assert box["token"]["y"] + box["token"]["height"] < box["connect"]["y"]  # then Connect
    assert box["connect"]["y"] == box["disconnect"]["y"]          # side by side, not stacked
    for name, b in box.items():                                     # nothing off the screen
        assert 0 <= b["x"] and b["x"] + b["width"] <= viewport["width"], name
    # The transport select shows its whole option.
    fit = page.evaluate("""() => {  // text and arrow, against the width the select has
        const select = document.querySelector('#transport');
        const canvas = document.createElement('canvas').getContext('2d');
        canvas.font = getComputedStyle(select).font;
        return [canvas.measureText(select.selectedOptions[0].text).width + 24, select.clientWidth];
    }""")
    assert fit[0] <= fit[1], fit
    page.screenshot(path=tmp_path / f"tester-{viewport['width']}.png", full_page=False)
    tab.connect_as("demo user")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    status = page.locator("#status").bounding_box()
    assert 0 <= status["y"] < viewport["height"]                    # the status stays in view
    if viewport["width"] < 720:                                     # the log is one tap away
        page.get_by_role("link", name="Log ↓").click()
        expect(page.locator("#log-title")).to_be_in_viewport()
    page.screenshot(path=tmp_path / f"tester-{viewport['width']}-scrolled.png")
    assert tab.console_errors == []


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


def test_check_this_server_passes_every_step_here(dev_server, open_tester):
    tab = open_tester(dev_server.url)
    tab.connect_as("demo user")
    tab.page.get_by_role("button", name="Check this server").click()
    steps = tab.page.locator("#check-results li")
    expect(steps).to_have_count(10, timeout=20_000)
    expect(tab.page.locator('#check-results li[data-ok="false"]')).to_have_count(0)
    assert steps.first.inner_text() == "whoami"
    expect(tab.log).to_contain_text("check this server: 10 of 10 steps as the contract says")


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
    expect(tab.page.locator("#check-results li")).to_have_count(10, timeout=20_000)
    failed = tab.page.locator('#check-results li[data-ok="false"]')
    expect(failed).to_have_count(1)
    expect(failed).to_contain_text("typing to itself")
    expect(failed.locator("pre")).to_contain_text('payload.ok: "yes" is not true')
    tab.page.screenshot(path=tmp_path / "check-this-server.png", full_page=True)
