"""The benchmark script works: `benchmarks/run.py --quick --json` against the test database.

This proves the harness runs end to end and that it verified its own results
(every delivery sent exactly once); it asserts nothing about speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent

FIXED_FIGURES = {
    "enqueue_single",
    "enqueue_many",
    "drain_null",
    "drain_null_2proc",
    "latency_p50_ms",
    "latency_p99_ms",
    "smtp_loopback",
    "claim_ms_empty",
    "claim_ms_1m",
    "claim_history_rows",
    # This machine's ceilings, beside the figures they bound.
    "enqueue_single_commit_ceiling",
    "enqueue_single_db_ceiling",
    "enqueue_single_of_db_ceiling",
    "enqueue_many_db_ceiling",
    "enqueue_many_of_db_ceiling",
    # CPU per delivery (psutil is a dev dependency), the whole machine's and PostgreSQL's.
    "drain_null_cpu_us",
    "drain_null_db_cpu_us",
    "drain_null_cores_busy",
    "drain_null_2proc_cpu_us",
    "drain_null_2proc_db_cpu_us",
    "drain_null_2proc_cores_busy",
    # WAL per mail enqueued and per delivery, read from the server's own position.
    "enqueue_single_wal_bytes",
    "enqueue_many_wal_bytes",
    "drain_null_wal_bytes",
    "drain_null_2proc_wal_bytes",
    # The drain again with the claim's history of sent deliveries in the table.
    "drain_null_1m",
    "drain_null_1m_cpu_us",
    "drain_null_1m_db_cpu_us",
    "drain_null_1m_cores_busy",
    "drain_null_1m_wal_bytes",
}
# pgqueuer is a benchmark-only dependency (benchmarks/requirements.txt): without it the
# script skips the peer and says so, and so does this test.
PEER_FIGURES = {
    "peer_pgqueuer_drain",
    "drain_vs_pgqueuer",
    "drain_vs_pgqueuer_min",
    "drain_vs_pgqueuer_max",
    "peer_pgqueuer_cpu_us",
    "peer_pgqueuer_db_cpu_us",
    "peer_pgqueuer_cores_busy",
    "peer_pgqueuer_wal_bytes",
}


def test_quick_benchmark_runs_and_verifies(empty_db_url: sa.URL) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--json",
            "--database-url",
            empty_db_url.render_as_string(hide_password=False),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    lines = proc.stdout.splitlines()
    assert lines, proc.stderr[-4000:]
    figures: dict[str, float] = {}
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"name", "value", "unit"}, line
        assert isinstance(record["name"], str) and record["name"], line
        assert isinstance(record["unit"], str) and record["unit"], line
        assert isinstance(record["value"], (int, float)), line
        assert math.isfinite(record["value"]), line
        assert record["name"] not in figures, f"{record['name']} printed twice"
        figures[record["name"]] = record["value"]

    expected = set(FIXED_FIGURES)
    if importlib.util.find_spec("pgqueuer") is not None:
        expected |= PEER_FIGURES
    assert expected <= set(figures), sorted(expected - set(figures))
    # The script verified every delivery was sent exactly once before printing.
    assert figures["verified"] == 1
    assert figures["verified_deliveries"] > 0
    for name in expected - {"claim_history_rows"}:
        assert figures[name] > 0, (name, figures)
    assert figures["claim_history_rows"] >= 100_000
    if "drain_vs_pgqueuer" in figures:
        # The ratio of the two sides' median rounds lies within the rounds' own ratios.
        low, high = figures["drain_vs_pgqueuer_min"], figures["drain_vs_pgqueuer_max"]
        assert low <= figures["drain_vs_pgqueuer"] <= high, figures
    # PostgreSQL's CPU is a share of the machine's, and a drain keeps no more cores busy
    # than the machine has.
    for drain in ("drain_null", "drain_null_2proc", "drain_null_1m"):
        assert figures[f"{drain}_db_cpu_us"] < figures[f"{drain}_cpu_us"], drain
        assert figures[f"{drain}_cores_busy"] <= (os.cpu_count() or 1) + 0.1, drain
        # Recording a delivery writes two row versions and an attempt row: a window that
        # missed the drain's writes would show far less.
        assert figures[f"{drain}_wal_bytes"] > 300, drain
    # An enqueue writes the mail itself (a 1 KB body here) into the WAL.
    for enqueue in ("enqueue_single", "enqueue_many"):
        assert figures[f"{enqueue}_wal_bytes"] > 1000, enqueue


def _load_benchmark_script() -> Any:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_each_side_of_the_comparison_reports_its_median_round() -> None:
    run = _load_benchmark_script()
    rounds = [
        run.Drained(rate, run.Cost(wal_bytes=n)) for n, rate in enumerate((7_400, 6_100, 6_900))
    ]
    # The round itself, so the rate and the costs printed beside it belong together.
    assert run.median_round(rounds) is rounds[2]
    assert run.median_round(rounds[:2]).rate == 6_100  # the lower middle of an even count
    assert run.median_round(rounds[:1]) is rounds[0]
