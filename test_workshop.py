"""A workshop day: the README on a fresh machine, the examples, a live shop.

What a presenter and the people in the room run, run here against real
servers: the README's links and tables, examples/flow.mjs on the official
JavaScript client when something goes wrong, and examples/shoppers.py filling
the shop that an admin watches.
"""

import json
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from conftest import MUG, SECRET, SERVER, make_token, new_user_id

README = (SERVER.parent / "README.md").read_text()
SHOPPERS = SERVER.parent / "examples" / "shoppers.py"
FLOW = SERVER.parent / "examples" / "flow.mjs"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    text = re.sub(r"[`*_]|\[([^]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_readme_link_to_an_anchor_or_a_file_resolves():
    prose = re.sub(r"```.*?```", "", README, flags=re.DOTALL)
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", prose, re.MULTILINE)}
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert links
    for link in links:
        if link.startswith("#"):
            assert link[1:] in anchors, f"README links to {link}, which no heading makes"
        elif not re.match(r"https?://", link):
            assert (SERVER.parent / link).exists(), f"README links to a missing file {link}"


def test_every_readme_code_block_is_closed_on_a_line_of_its_own():
    """A fence followed by text on its line does not close the block: the rest
    of the README would render as code."""
    fences = [line for line in README.splitlines() if line.startswith("```")]
    assert fences
    closing = fences[1::2]
    assert len(fences) % 2 == 0 and all(line == "```" for line in closing), \
        [line for line in closing if line != "```"]


def test_the_readme_rate_limit_table_holds_the_servers_defaults():
    script = "import json, server; print(json.dumps(server.DEFAULT_RATE_LIMITS))"
    done = subprocess.run([sys.executable, "-c", script], cwd=SERVER.parent,
                          capture_output=True, text=True, timeout=30, check=True)
    defaults = {event: tuple(limit) for event, limit in json.loads(done.stdout).items()}
    rows = re.findall(r"^\| (.+?) \| (\d+) per (\d+) s \|$",
                      README.split("### Rate limits", 1)[1], re.MULTILINE)
    table = {re.findall(r"`([^`]+)`", cell)[-1]: (int(count), float(window))
             for cell, count, window in rows}
    assert table == defaults


def run_flow(server) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(FLOW), server.url], cwd=FLOW.parent, text=True,
                          capture_output=True, timeout=60, check=False)


def test_the_flow_example_stops_with_the_servers_error_when_the_mug_is_sold_out(start_server):
    server = start_server(env={"JWT_SECRET": None})
    with sqlite3.connect(server.db) as db:
        db.execute("UPDATE products SET stock = 0 WHERE id = ?", (MUG,))
    done = run_flow(server)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"order:create failed: Insufficient stock for product {MUG}"
                                   " — python server.py reset restocks the demo catalogue")
    assert "message { ok: true" in done.stdout   # what came before the order ran


def test_the_flow_example_says_when_the_server_gives_no_dev_tokens(start_server):
    done = run_flow(start_server())   # JWT_SECRET set: /dev/token is 404
    assert done.returncode == 1
    assert done.stderr.strip() == "no dev token (404): Not found"
    assert "TypeError" not in done.stderr


def run_shoppers(server, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SHOPPERS), "--url", server.url, *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_shoppers_fill_the_lobby_with_a_shop_that_an_admin_watches(start_server, connect):
    server = start_server(env={"JWT_SECRET": None})
    token = server.get_json(f"/dev/token?user={new_user_id('presenter')}&role=admin")["token"]
    admin = connect(token=token, on=server)
    assert admin.call("whoami")["role"] == "admin" and admin.call("joinRoom", "lobby")["ok"]
    done = run_shoppers(server, "--shoppers", "3", "--seconds", "5", "--rate", "10",
                        "--seed", "7")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    admin.fence()      # what the shoppers made the server send has arrived
    assert {m["from"]["id"] for m in admin.received("message")} <= {
        "shopper-1", "shopper-2", "shopper-3"}
    for event in ("message", "typing", "order:created", "order:updated",
                  "product:stockUpdated"):
        assert admin.received(event), f"the admin saw no {event}"
    lines = done.stdout.splitlines()
    assert sum("joinRoom" in line and line.endswith("ok") for line in lines) == 3
    assert any("✕" in line for line in lines)   # a mistake now and then, with its error
    assert any("order:updateStatus paid" in line and line.endswith("ok") for line in lines)


def test_shoppers_never_sell_the_catalogue_out(start_server, connect):
    server = start_server(env={"JWT_SECRET": None})
    watcher = connect(on=server)
    done = run_shoppers(server, "--shoppers", "4", "--seconds", "8", "--rate", "40",
                        "--seed", "3")
    assert done.returncode == 0, done.stderr
    watcher.fence()    # every stock update of the run has arrived
    updates = watcher.received("product:stockUpdated")
    assert any(u["delta"] < 0 for u in updates) and any(u["delta"] > 0 for u in updates)
    assert min(u["stock"] for u in updates) >= 5
    assert "Insufficient stock" not in done.stdout


def test_shoppers_read_tokens_from_a_file_when_the_server_has_jwt_secret(start_server,
                                                                        tmp_path):
    server = start_server(env={"JWT_SECRET": SECRET})
    refused = run_shoppers(server, "--shoppers", "2", "--seconds", "1")
    assert refused.returncode != 0 and "--tokens FILE" in refused.stderr
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(make_token(f"shopper-{n}") + "\n" for n in (1, 2)))
    done = run_shoppers(server, "--shoppers", "2", "--seconds", "1", "--tokens", str(tokens))
    assert done.returncode == 0, done.stderr
    assert sum("joinRoom" in line and line.endswith("ok") for line in done.stdout.splitlines()) \
        == 2


class Lines:
    """A process's output, read line by line in a thread, so that waiting for
    a line has a deadline: a script that hangs fails with what it printed."""

    def __init__(self, stream) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.reader.start()

    def _read(self, stream) -> None:
        with stream:
            for line in stream:
                self.queue.put(line.rstrip("\n"))
        self.queue.put(None)                     # the end of the output

    def first(self, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{len(self.lines)} lines, not {count}, within {timeout}s:"
                                     f"\n{self.text()}") from None
            assert line is not None, f"the output ended after {len(self.lines)} lines:\n" \
                                     f"{self.text()}"
            self.lines.append(line)
        return self.lines[:count]

    def rest(self, timeout: float) -> str:
        """Everything, once the output has ended (the process has exited)."""
        self.reader.join(timeout)
        while not self.queue.empty():
            if (line := self.queue.get()) is not None:
                self.lines.append(line)
        return self.text()

    def text(self) -> str:
        return "\n".join(self.lines)


def test_shoppers_stop_cleanly_on_ctrl_c(start_server, tmp_path):
    server = start_server(env={"JWT_SECRET": None})
    errors = tmp_path / "shoppers-stderr.txt"
    with errors.open("w") as stderr:
        shoppers = subprocess.Popen([sys.executable, str(SHOPPERS), "--url", server.url,
                                     "--shoppers", "2"], stdout=subprocess.PIPE, stderr=stderr,
                                    text=True)
    out = Lines(shoppers.stdout)
    try:
        # Both shoppers have joined, then one has done something: the shop is running.
        joins = out.first(3, timeout=20)[:2]
        assert all("joinRoom" in line and line.endswith("ok") for line in joins), out.text()
        shoppers.send_signal(signal.SIGINT)
        returncode = shoppers.wait(timeout=20)
    finally:
        if shoppers.poll() is None:
            shoppers.kill()
            shoppers.wait()
    assert returncode == 0, errors.read_text()
    assert "stopping: the shoppers leave" in out.rest(timeout=5)
    assert "Traceback" not in errors.read_text()
