"""The benchmark (``python -m tests.bench``) still runs: a tiny ``--smoke`` pass
(a few seconds per part) must print a parseable ``BENCH {json}`` line with every
part's numbers. The full targets are not asserted here (too noisy at this size);
the regression gate is: refresher at least 0.6 as fast as raw httpx2 and 0.7 as fast
as authlib (median of five paired rounds, so a noisy neighbour slows both sides of a
pair; 0.71–0.92 and 0.88–1.13 measured here), no refresh missed, nothing over the rate
limit and strictly earliest-expiring first, no mint after a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_prints_bench_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    assert len(lines) == 1, proc.stdout[-3000:]
    bench = json.loads(lines[0][len("BENCH ") :])

    assert {"mode", "throughput", "scale", "growth", "ratelimit", "restart", "targets"} <= set(bench)
    assert bench["mode"] == "smoke"
    for concurrency, ratios in bench["throughput"]["ratios"].items():
        assert ratios["refresher_over_raw"] >= 0.6, (concurrency, ratios)
        assert ratios["refresher_over_authlib"] >= 0.7, (concurrency, ratios)
    scale = bench["scale"]
    for key in ("rss_steady_mb", "cpu_per_refresh_ms", "lag_ms", "peak_inflight", "raw_paced"):
        assert key in scale
    assert {"p50", "p99", "max"} <= set(scale["lag_ms"])
    assert scale["refreshes"] > 0
    assert scale["missed"] == 0
    assert scale["failures"] == 0
    limit = bench["ratelimit"]
    assert limit["over_limit"] == 0
    assert limit["http_429"] == 0
    assert limit["order_inversions"] == 0
    assert limit["all_valid_sim_min"] > 0
    restart = bench["restart"]["restart"]
    assert restart["recovered"] == restart["jobs"]
    assert restart["mints_in_window"] == 0
    assert bench["targets_total"] == len(bench["targets"]) > 0
