"""The benchmark command runs end to end: both servers start, the load
generator drives them, and the table reports every scenario without failures.
It checks that the figures can be produced, never what they are."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "bench" / "run.py"


def test_the_benchmark_prints_a_table_with_no_failures():
    run = subprocess.run(
        [sys.executable, str(BENCH), "--rounds", "1", "--seconds", "0.5", "--deflate", "off",
         "--only", "acks", "fanout-10", "orders", "payments", "idle-100", "catchup"],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if re.match(r"\| [a-z]", line)]
    assert "paired ratio per server-CPU-s" in rows[0]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| acks", "| fanout-10", "| orders", "| payments", "| idle-100", "| catchup"]
    for row in rows[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[-1] == "0", row                    # failures
        assert float(cells[3].replace(",", "")) > 0, row  # server.py's rate
        if cells[0] == "catchup":                       # the ceiling has no event log
            assert cells[4] == "-" and cells[7] == "-", row
        else:
            assert float(cells[4].replace(",", "")) > 0, row  # the ceiling's rate
            assert re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d, n=1\)", cells[7]), row
    assert re.search(r"Catch-up of 1,000 events.*\n- catchup deflate=off: p50 [\d.,]+ / -",
                     run.stdout)


def test_the_benchmark_counts_instructions_per_event_under_callgrind():
    """`--instructions`: both servers run under callgrind, counted only during
    the window; the table gains the paired ratio per instruction."""
    run = subprocess.run(
        [sys.executable, str(BENCH), "--rounds", "1", "--seconds", "1", "--deflate", "off",
         "--only", "acks", "--against", "HEAD", "--instructions"],
        capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    assert re.search(r"round 1 acks .* per-G-instructions=\s*[\d,]+", run.stderr), run.stderr
    rows = [line for line in run.stdout.splitlines() if re.match(r"\| [a-z]", line)]
    assert "paired ratio per instruction" in rows[0]
    cells = [cell.strip() for cell in rows[1].strip("|").split("|")]
    assert cells[0] == "acks" and cells[12] == "0", rows[1]          # no failures
    assert re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d, n=1\)", cells[13]), rows[1]
