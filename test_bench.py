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
