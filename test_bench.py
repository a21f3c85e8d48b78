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
         "--only", "acks", "fanout-10", "orders", "payments", "idle-100"],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if re.match(r"\| [a-z]", line)]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| acks", "| fanout-10", "| orders", "| payments", "| idle-100"]
    for row in rows[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[-1] == "0", row                    # failures
        assert float(cells[3].replace(",", "")) > 0, row  # server.py's rate
        assert float(cells[4].replace(",", "")) > 0, row  # the ceiling's rate
