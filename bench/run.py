"""Benchmark server.py against the ceiling (bench/ceiling.py) and print medians.

    python bench/run.py                  # every scenario, 3 interleaved rounds
    python bench/run.py --rounds 5 --seconds 5 --only acks fanout-1000
    python bench/run.py --against HEAD~1 # this server.py against another commit's
    python bench/run.py --against HEAD   # A/A: how far two runs of one server spread
    python bench/run.py --only catchup   # a reconnecting client catching up 1,000 events

Each measurement starts the server under test on a free port with a fresh
database and rate limits off, pinned to CPU 0 (taskset), and the load generator
(bench/load.mjs, the official socket.io-client on Node.js) pinned to CPU 1.
Rounds interleave the two servers so that machine noise hits both, and each
round's pair gives a ratio of events per server-CPU-second: the table shows the
median of these paired ratios with their min and max (run `--against HEAD` for
the spread of an A/A comparison).
Needs `npm ci` (socket.io-client) and `taskset` (util-linux).

`--instructions` runs each server under valgrind's callgrind instead, counting
the user-space instructions it executes during the window only (instrumentation
is switched on and off around it): events per billion instructions, within
about 1 % between two runs of the same code whatever else the machine is doing,
where server-CPU-seconds here spread 10-30 % between two runs of one server. It does
not see the kernel (system calls) and runs the servers ~50x slower, so use it
beside the timed figures, not instead of them. Needs valgrind.

"catchup" needs the event log: the ceiling has none and is not measured there,
and a server without it (no X-Log-Offset on /api/products) has no figure ("-").
"""

import argparse
import json
import os
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECRET = "benchmark-secret-benchmark-secret-benchmark"
SERVERS = {"server.py": ROOT / "server.py", "ceiling": HERE / "ceiling.py"}

# name -> (load.mjs config, which figure is the headline)
SCENARIOS = {
    "acks": ({"scenario": "acks", "clients": 50}, "acks/s"),
    "fanout-10": ({"scenario": "fanout", "members": 10}, "deliveries/s"),
    "fanout-100": ({"scenario": "fanout", "members": 100}, "deliveries/s"),
    "fanout-1000": ({"scenario": "fanout", "members": 1000}, "deliveries/s"),
    "orders": ({"scenario": "orders", "clients": 20}, "orders/s"),
    "payments": ({"scenario": "payments", "clients": 20, "ordersPerClient": 1000}, "updates/s"),
    "idle-100": ({"scenario": "connections", "idle": 100, "clients": 20}, "whoami/s"),
    "idle-1000": ({"scenario": "connections", "idle": 1000, "clients": 20}, "whoami/s"),
    "idle-5000": ({"scenario": "connections", "idle": 5000, "clients": 20}, "whoami/s"),
    "polling": ({"scenario": "acks", "clients": 20, "transport": "polling"}, "acks/s"),
    "catchup": ({"scenario": "catchup", "events": 1000, "clients": 1}, "catch-ups/s"),
}
LOGGED = {"catchup"}    # scenarios that need the event log, which the ceiling lacks


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024


def start(kind: str, workdir: Path, counted: Path | None = None) -> tuple[subprocess.Popen, str]:
    db = workdir / "bench.db"
    if kind != "ceiling":
        # Stock that never runs out, so payments measure the write path, not refusals.
        with sqlite3.connect(db) as connection:
            connection.executescript((SERVERS[kind].parent / "schema.sql").read_text())
            connection.execute("UPDATE products SET stock = 1000000000")
        connection.close()
    env = {**os.environ, "JWT_SECRET": SECRET, "RATE_LIMITS": "off"}
    under = [] if counted is None else [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={counted}"]
    process = subprocess.Popen(
        ["taskset", "-c", "0", *under, sys.executable, str(SERVERS[kind]), "--port", "0",
         "--db", str(db)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=env, cwd=workdir)
    for line in process.stdout:
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return process, match[1]
    raise RuntimeError(f"{kind} did not start")


def callgrind(server: subprocess.Popen, switch: str) -> None:
    subprocess.run(["callgrind_control", "--instr=" + switch, str(server.pid)],
                   check=True, capture_output=True)


def measure(kind: str, scenario: str, seconds: float, deflate: bool,
            instructions: bool = False) -> dict:
    config, _ = SCENARIOS[scenario]
    with tempfile.TemporaryDirectory() as workdir:
        counted = Path(workdir) / "callgrind.out" if instructions else None
        server, url = start(kind, Path(workdir), counted)
        try:
            time.sleep(0.3)
            base_rss = rss_bytes(server.pid)
            load = subprocess.Popen(
                ["taskset", "-c", "1", "node", str(HERE / "load.mjs"), json.dumps(
                    {**config, "url": url, "secret": SECRET, "seconds": seconds,
                     "deflate": deflate})],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            started = json.loads(load.stdout.readline())
            extra = {}
            if "opened" in started and not counted:  # idle connections: what do they cost?
                extra["bytesPerConnection"] = (rss_bytes(server.pid) - base_rss) / started["opened"]
            if counted:
                callgrind(server, "on")
            cpu_before = cpu_seconds(server.pid)
            load.stdin.write("go\n")
            load.stdin.flush()
            json.loads(load.stdout.readline())          # the window has ended
            server_cpu = cpu_seconds(server.pid) - cpu_before
            if counted:
                callgrind(server, "off")
            result = json.loads(load.stdout.readline())
            load.wait(60)
        finally:
            server.terminate()
            try:
                server.wait(60 if counted else 10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if result.get("unsupported"):   # no event log: no figure, not a failure
            result.update(serverCpu=None, perServerCpuSecond=None, generatorCpu=None)
            return result
        result.update(extra, serverCpu=server_cpu / result["wall"],
                      perServerCpuSecond=result["count"] / max(server_cpu, 1e-9))
        if counted:   # callgrind writes its counts when the server exits
            total = int(re.search(r"^totals: (\d+)", counted.read_text(), re.MULTILINE)[1])
            result["perGigaInstruction"] = result["count"] / max(total, 1) * 1e9
        return result


def checkout(rev: str) -> Path:
    """The project's files at a commit, in a temporary folder (git archive)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    archive = folder / "rev.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "tree", filter="data")
    return folder / "tree"


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def paired(ours: list[dict], theirs: list[dict], field: str = "perServerCpuSecond") -> str:
    """Median, min and max over rounds of the per-round ratio ours / theirs."""
    by_round = {r["round"]: r.get(field) for r in theirs}
    ratios = [r[field] / by_round[r["round"]] for r in ours
              if r.get(field) is not None and by_round.get(r["round"])]
    if not ratios:
        return "-"
    return (f"{statistics.median(ratios):.2f}"
            f" ({min(ratios):.2f}–{max(ratios):.2f}, n={len(ratios)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed window per measurement")
    parser.add_argument("--only", nargs="*", choices=list(SCENARIOS), help="scenarios to run")
    parser.add_argument("--deflate", choices=("off", "on", "both"), default="both",
                        help="clients offering permessage-deflate")
    parser.add_argument("--against", metavar="REV",
                        help="compare with server.py at a git commit instead of the ceiling")
    parser.add_argument("--instructions", action="store_true",
                        help="count the servers' instructions under callgrind (see above)")
    args = parser.parse_args()
    if args.against:
        SERVERS.pop("ceiling")
        SERVERS[args.against] = checkout(args.against) / "server.py"
    for tool in ("taskset", "node", *(("valgrind", "callgrind_control") if args.instructions
                                      else ())):
        if not shutil.which(tool):
            sys.exit(f"bench/run.py needs {tool}")
    if not (ROOT / "node_modules" / "socket.io-client").exists():
        sys.exit("bench/run.py needs the JavaScript client: run `npm ci` first")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # 5000 sockets on each side

    scenarios = args.only or list(SCENARIOS)
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.deflate]
    results: dict[tuple, list[dict]] = {}

    def deflates(scenario: str) -> list[bool]:
        """Long-polling has no permessage-deflate to offer."""
        return [False] if SCENARIOS[scenario][0].get("transport") == "polling" else variants
    for key in ((s, d, k) for s in scenarios for d in deflates(s) for k in SERVERS):
        results[key] = []
    for round_number in range(1, args.rounds + 1):
        for scenario in scenarios:
            for deflate in deflates(scenario):
                for kind in SERVERS if round_number % 2 else reversed(SERVERS):
                    if kind == "ceiling" and scenario in LOGGED:
                        continue
                    result = measure(kind, scenario, args.seconds, deflate, args.instructions)
                    result["round"] = round_number
                    results[(scenario, deflate, kind)].append(result)
                    print(f"round {round_number} {scenario:12}"
                          f" deflate={'on ' if deflate else 'off'} {kind:9}"
                          f" {fmt(result['rate']):>10}/s"
                          f" per-cpu-s={fmt(result['perServerCpuSecond']):>9}"
                          + (f" per-G-instructions={fmt(result.get('perGigaInstruction')):>9}"
                             if args.instructions else "") +
                          f"  failures={result['failures']}",
                          file=sys.stderr, flush=True)

    def median(key, field):
        values = [r[field] for r in results[key] if r.get(field) is not None]
        return statistics.median(values) if values else None

    print(f"\nMedians of {args.rounds} rounds, {args.seconds:g} s windows; server on CPU 0,"
          " load generator on CPU 1.\n")
    other = next(kind for kind in SERVERS if kind != "server.py")   # the ceiling, or --against
    pair = f"(server.py / {other})"
    print(f"| scenario | deflate | figure | server.py | {other} | ratio | per server-CPU-s {pair}"
          f" | paired ratio per server-CPU-s (median of rounds, min–max) {pair}"
          f" | p50 ms | p99 ms {pair} | memory/conn {pair} | generator CPU | failures |"
          + (f" paired ratio per instruction (median of rounds, min–max) {pair} |"
             if args.instructions else ""))
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
          + ("---:|" if args.instructions else ""))
    for scenario in scenarios:
        for deflate in deflates(scenario):
            ours, ceiling = (scenario, deflate, "server.py"), (scenario, deflate, other)
            rate, top = median(ours, "rate"), median(ceiling, "rate")
            memory = ""
            if median(ours, "bytesPerConnection") is not None:
                memory = (f"{fmt(median(ours, 'bytesPerConnection') / 1024, 1)} KiB /"
                          f" {fmt(median(ceiling, 'bytesPerConnection') / 1024, 1)} KiB")
            failures = sum(r["failures"] for r in results[ours] + results[ceiling])
            print(f"| {scenario} | {'on' if deflate else 'off'} | {SCENARIOS[scenario][1]}"
                  f" | {fmt(rate)} | {fmt(top)} | {fmt(rate / top if top else None, 2)}"
                  f" | {fmt(median(ours, 'perServerCpuSecond'))}"
                  f" / {fmt(median(ceiling, 'perServerCpuSecond'))}"
                  f" | {paired(results[ours], results[ceiling])}"
                  f" | {fmt(median(ours, 'p50'), 2)} / {fmt(median(ceiling, 'p50'), 2)}"
                  f" | {fmt(median(ours, 'p99'), 2)} / {fmt(median(ceiling, 'p99'), 2)}"
                  f" | {memory}"
                  f" | {percent(median(ours, 'generatorCpu'))}"
                  f" / {percent(median(ceiling, 'generatorCpu'))}"
                  f" | {failures} |"
                  + (f" {paired(results[ours], results[ceiling], 'perGigaInstruction')} |"
                     if args.instructions else ""))
    if any(r.get("connectRate") for rs in results.values() for r in rs):
        print(f"\nConnect rate (connections/s, {pair}):")
        for scenario in scenarios:
            if SCENARIOS[scenario][0]["scenario"] == "connections":
                for deflate in variants:
                    print(f"- {scenario} deflate={'on' if deflate else 'off'}:"
                          f" {fmt(median((scenario, deflate, 'server.py'), 'connectRate'))} /"
                          f" {fmt(median((scenario, deflate, other), 'connectRate'))}")
    for scenario in (s for s in scenarios if s in LOGGED):
        events = SCENARIOS[scenario][0]["events"]
        print(f"\nCatch-up of {events:,} events, connect to sync (median p50 / p99 ms,"
              f" {pair}):")
        for deflate in deflates(scenario):
            ours, theirs = (scenario, deflate, "server.py"), (scenario, deflate, other)
            print(f"- {scenario} deflate={'on' if deflate else 'off'}:"
                  f" p50 {fmt(median(ours, 'p50'), 1)} / {fmt(median(theirs, 'p50'), 1)},"
                  f" p99 {fmt(median(ours, 'p99'), 1)} / {fmt(median(theirs, 'p99'), 1)}")


if __name__ == "__main__":
    main()
