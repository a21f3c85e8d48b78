"""ws-tester.html in real headless Chromium against a real server.py.

Chromium comes from the system (Debian's `chromium`; another path in $CHROMIUM)
and Playwright drives it. The machine has no internet: every test here is also a
test that the page works offline.
"""

import base64
import http.client
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import SERVER

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
    expect(user.log).to_contain_text("socket.io-client loaded from this server")

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
        expect(tab.log).to_contain_text('"text": "Hello from the tester"')

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

    admin.card("order:updateStatus").get_by_role("button", name="order:updateStatus to shipped").click()
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
    page.get_by_role("button", name="demo admin").click()
    expect(page.locator("#token")).to_have_value(re.compile("^Bearer "))
    page.get_by_role("button", name="Connect", exact=True).click()
    expect(page.locator("#log")).to_contain_text("CONNECTED: ")
    assert errors == []
    context.close()


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
    connection.request("GET", "/admin-ui/../../../server.py", headers={"Authorization": f"Basic {auth}"})
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
