"""``python -m tests.bench [--quick | --smoke | --growth]``: the whole benchmark, one command.

Parts run in child processes (each part's RSS and CPU are its own; the token
server always runs in yet another process):

1. throughput: raw httpx2 vs authlib vs refresher's refresh path (`throughput`);
2. scale: 10,000 Debitura tenants in steady state on the real clock (`scale`), then
   the checks: 2,000 tenants with 40 s tokens (CPU) and 10,000 with 60 s tokens (lag);
3. rate-limit compliance: 2,000 Gooclaim jobs, one client id, simulated time
   (`ratelimit`);
4. restart cost: cold start, graceful stop, restart from the files (`restart`);
5. growth: part 2 at 100 and 1,000 tenants too (``--growth`` alone: the grid of
   100 / 1k / 10k / 50k tenants × 60 s / 30 min tokens).

Prints a table and one ``BENCH {json}`` line; exits 0 whether or not targets are
met (the table says which), non-zero only if the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.bench.common import REPO, ServerProcess, run_child, sink_root
from tests.bench.scale import mean_refresh_interval

PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "n": 500,
        "rounds": 8,
        "concurrency": "1,8,32",
        "scale_jobs": 10_000,
        "lifetime": 120,
        "duration": 180,
        "raw_n": 2000,
        "paced_s": 8,
        "growth": [100, 1000],
        # (jobs, token lifetime s, duration s, what the run is held to)
        "checks": [(2000, 40, 90, "cpu"), (10_000, 60, 120, "lag")],
        "restart_jobs": 10_000,
        "observe": 60,
        "rl_jobs": 2000,
    },
    "quick": {
        "n": 250,
        "rounds": 4,
        "concurrency": "1,8,32",
        "scale_jobs": 2000,
        "lifetime": 30,
        "duration": 45,
        "raw_n": 500,
        "paced_s": 4,
        "growth": [100, 500],
        "checks": [(3000, 20, 45, "lag")],
        "restart_jobs": 2000,
        "observe": 20,
        "rl_jobs": 300,
    },
    "smoke": {
        "n": 100,
        "rounds": 5,
        "concurrency": "1,8",
        "scale_jobs": 150,
        "lifetime": 8,
        "duration": 4,
        "raw_n": 40,
        "paced_s": 0.5,
        "growth": [],
        "checks": [],
        "restart_jobs": 150,
        "observe": 1,
        "rl_jobs": 70,
    },
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


#: The growth grid (``--growth``): tenants × token lifetime, one run each.
GROWTH_TENANTS = (100, 1000, 10_000, 50_000)
GROWTH_LIFETIMES = (60, 1800)
#: Refreshes per second one run may ask of this 2-core machine (~0.6 of a core).
GROWTH_MAX_RATE = 250


def scale_args(
    p: dict[str, Any],
    jobs: int,
    *,
    reference: bool,
    lifetime: float | None = None,
    duration: float | None = None,
) -> list[str]:
    return [
        "--jobs",
        str(jobs),
        "--lifetime",
        str(lifetime or p["lifetime"]),
        "--duration",
        str(duration or p["duration"]),
        "--raw-n",
        str(p["raw_n"] if reference else 0),
        "--raw-paced-s",
        str(p["paced_s"]),
    ]


def run_restart_and_ratelimit(p: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cold start + graceful stop, then restart; the rate-limit simulation runs while
    the restarted daemon sits out its observation window (it only counts requests)."""
    directory = tempfile.mkdtemp(prefix="refresher-restart-", dir=sink_root())
    try:
        with ServerProcess("fast", lifetime=1800) as server:
            common = ["--jobs", str(p["restart_jobs"]), "--dir", directory, "--url", server.url]
            log(f"restart: cold start of {p['restart_jobs']} tenants")
            prepared = run_child("tests.bench.restart", ["prepare", *common], timeout=600)
            log("restart: restarting from the token files")
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.bench.restart",
                    "restart",
                    *common,
                    "--observe",
                    str(p["observe"]),
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert child.stdout is not None
                for line in child.stdout:
                    if line.startswith("READY "):
                        break
                log(f"rate limit: {p['rl_jobs']} Gooclaim jobs, one client id (simulated time)")
                ratelimit = run_child(
                    "tests.bench.ratelimit", ["--jobs", str(p["rl_jobs"])], timeout=600
                )
                restarted: dict[str, Any] | None = None
                for line in child.stdout:
                    if line.startswith("RESULT "):
                        restarted = json.loads(line[len("RESULT ") :])
                if child.wait(timeout=p["observe"] + 120) != 0 or restarted is None:
                    raise RuntimeError("restart child failed")
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
                if child.stdout is not None:
                    child.stdout.close()
        return {"prepare": prepared, "restart": restarted}, ratelimit
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def evaluate(result: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(target, required, measured, met) rows."""
    rows: list[tuple[str, str, str, bool]] = []
    tp = result["throughput"]
    for c, ratio in tp["ratios"].items():
        r = ratio["refresher_over_raw"]
        rows.append((f"mint throughput c={c}: refresher / raw httpx2", ">= 0.85", f"{r:.2f}", r >= 0.85))
        a = ratio["refresher_over_authlib"]
        rows.append((f"mint throughput c={c}: refresher / authlib", ">= 1.00", f"{a:.2f}", a >= 1.0))
    sc = result["scale"]
    rows.append(("scale: RSS after steady state", "<= 150 MB", f"{sc['rss_steady_mb']:.0f} MB", sc["rss_steady_mb"] <= 150))
    p99 = sc["lag_ms"]["p99"]
    rows.append(("scale: scheduler lag p99", "<= 50 ms", f"{p99:.1f} ms", p99 <= 50))
    rows.append(("scale: refreshes missed", "0", str(sc["missed"]), sc["missed"] == 0))
    for key, label in (("raw_paced", "paced, same request rate"), ("raw_saturated", "saturated, c=16")):
        ref = sc.get(key, {}).get("cpu_per_request_ms")
        if ref:
            ratio = sc["cpu_per_refresh_ms"] / ref
            rows.append((f"scale: CPU/refresh vs raw httpx2 ({label})", "<= 1.5x", f"{ratio:.2f}x", ratio <= 1.5))
    for check in result.get("checks", []):
        where = f"{check['jobs']:,} tenants, {check['lifetime_s']:.0f} s tokens"
        if check["check"] == "cpu":
            ratio = check["cpu_per_refresh_ms"] / check["raw_saturated"]["cpu_per_request_ms"]
            rows.append((f"{where}: CPU/refresh vs raw (saturated)", "<= 1.5x", f"{ratio:.2f}x", ratio <= 1.5))
        else:
            p99 = check["lag_ms"]["p99"]
            rows.append((f"{where}: scheduler lag p99", "<= 50 ms", f"{p99:.1f} ms", p99 <= 50))
            rows.append((f"{where}: refreshes missed", "0", str(check["missed"]), check["missed"] == 0))
    rl = result["ratelimit"]
    rows.append(("rate limit: requests over the limit (and 429s)", "0", f"{rl['over_limit']} ({rl['http_429']})", rl["over_limit"] == 0 and rl["http_429"] == 0))
    ok_time = rl["tight_bound_min"] <= rl["all_valid_sim_min"] <= rl["arithmetic_min"] + 1
    rows.append(("rate limit: time until all valid", f"~{rl['arithmetic_min']:.1f} min", f"{rl['all_valid_sim_min']:.2f} min", ok_time))
    rows.append(("rate limit: earliest-expiring first (inversions)", "0", str(rl["order_inversions"]), rl["order_inversions"] == 0))
    rows.append(("rate limit: refreshes missed", "0", str(rl["missed"]), rl["missed"] == 0))
    rs = result["restart"]["restart"]
    rows.append((f"restart: mints in the first {rs['observe_s']:.0f} s", "0", str(rs["mints_in_window"]), rs["mints_in_window"] == 0))
    rows.append(("restart: all jobs valid via recovery", str(rs["jobs"]), str(rs["recovered"]), rs["recovered"] == rs["jobs"]))
    return rows


def table(result: dict[str, Any], rows: list[tuple[str, str, str, bool]]) -> str:
    out: list[str] = []
    tp = result["throughput"]
    out.append(f"== 1. Mint throughput ({tp['rounds']} rounds of N={tp['n']} per implementation; mints/s: best round; ratios: median of per-round ratios; server: {tp['server']})")
    out.append(f"{'conc':>4}  {'raw mints/s':>11}  {'authlib':>8}  {'refresher':>9}  {'ref/raw':>7}  {'ref/authlib':>11}  {'CPU/mint us raw/auth/ref':>26}  {'server CPU':>10}")
    for c in tp["ratios"]:
        b = {impl: tp["best"][impl][c] for impl in ("raw", "authlib", "refresher")}
        cpu = "/".join(f"{b[i]['cpu_per_mint_us']:.0f}" for i in b)
        server = max(b[i]["server_cpu_share"] for i in b)
        out.append(
            f"{c:>4}  {b['raw']['mints_per_s']:>11.0f}  {b['authlib']['mints_per_s']:>8.0f}  "
            f"{b['refresher']['mints_per_s']:>9.0f}  {tp['ratios'][c]['refresher_over_raw']:>7.2f}  "
            f"{tp['ratios'][c]['refresher_over_authlib']:>11.2f}  {cpu:>26}  {server:>9.0%}"
        )
    sc = result["scale"]
    out.append("")
    out.append(f"== 2. Scale: {sc['jobs']:,} Debitura tenants, {sc['lifetime_s']:.0f} s tokens, {sc['run_s']:.0f} s on the real clock, sinks on {sc['sink_fs']}")
    out.append(f"refreshes {sc['refreshes']:,} ({sc['refreshes_per_job']:.1f}/job, {sc['refresh_rate_per_s']:.0f}/s)  missed {sc['missed']}  failures {sc['failures']}  invalid at end {sc['invalid_at_end']}")
    out.append(f"RSS steady {sc['rss_steady_mb']:.0f} MB (before daemon {sc['rss_before_daemon_mb']:.0f} MB)  load {sc['load_s']:.1f} s  peak in-flight {sc['peak_inflight']}  server CPU {sc['server_cpu_share']:.0%}")
    lag = sc["lag_ms"]
    out.append(f"scheduler lag ms: p50 {lag['p50']:.1f}  p99 {lag['p99']:.1f}  max {lag['max']:.1f}  (n={lag['n']:,})")
    refs = []
    for key, label in (("raw_paced", "paced"), ("raw_saturated", "saturated c=16")):
        if key in sc:
            refs.append(f"raw {label} {sc[key]['cpu_per_request_ms']:.2f} ms/req")
    out.append(f"CPU/refresh {sc['cpu_per_refresh_ms']:.2f} ms ({sc['cpu_share']:.0%} of a core); " + "; ".join(refs))
    out.append("")
    out.append("== 5. Growth (same run shape per size)")
    out.append(f"{'tenants':>8}  {'RSS MB':>7}  {'RSS-base MB':>11}  {'KB/tenant':>9}  {'CPU/refresh ms':>14}  {'refreshes':>9}  {'lag p99 ms':>10}")
    for g in result["growth"]:
        delta = g["rss_steady_mb"] - g["rss_before_daemon_mb"]
        out.append(
            f"{g['jobs']:>8,}  {g['rss_steady_mb']:>7.0f}  {delta:>11.1f}  {delta * 1024 / g['jobs']:>9.1f}  "
            f"{g['cpu_per_refresh_ms']:>14.2f}  {g['refreshes']:>9,}  {g['lag_ms']['p99']:>10.1f}"
        )
    for check in result.get("checks", []):
        lag = check["lag_ms"]
        line = (
            f"== 2{'bc'[result['checks'].index(check) % 2]}. Scale check: {check['jobs']:,} tenants, {check['lifetime_s']:.0f} s tokens, "
            f"{check['run_s']:.0f} s: {check['refresh_rate_per_s']:.0f} refreshes/s, CPU/refresh {check['cpu_per_refresh_ms']:.2f} ms "
            f"({check['cpu_share']:.0%} of a core), lag p50/p99/max {lag['p50']:.1f}/{lag['p99']:.1f}/{lag['max']:.1f} ms, "
            f"missed {check['missed']}, RSS {check['rss_steady_mb']:.0f} MB"
        )
        if "raw_saturated" in check:
            line += f", raw saturated c=16 {check['raw_saturated']['cpu_per_request_ms']:.2f} ms/req"
        out.append("")
        out.append(line)
    rl = result["ratelimit"]
    out.append("")
    out.append(f"== 3. Rate limit: {rl['jobs']:,} Gooclaim jobs, one client id, {rl['limit_per_min']}/min (simulated clock, {rl['real_s']:.0f} s real)")
    out.append(f"all valid after {rl['all_valid_sim_min']:.2f} min (arithmetic {rl['arithmetic_min']:.2f}, sliding-window bound {rl['tight_bound_min']:.2f})  requests {rl['token_requests']:,}  max in any window {rl['max_in_window']}  429s {rl['http_429']}")
    out.append(f"refresh round: {rl['phase_b_requests']:,} requests, {rl['contended_requests']:,} sent while others waited, order inversions {rl['order_inversions']:,}, missed {rl['missed']}")
    rp, rs = result["restart"]["prepare"], result["restart"]["restart"]
    out.append("")
    out.append(f"== 4. Restart: {rs['jobs']:,} valid JSON tokens on disk")
    out.append(f"cold start: {rp['mints']:,} mints in {rp['cold_start_s']:.1f} s ({rp['cold_start_mints_per_s']:.0f}/s, {rp['cold_start_cpu_per_mint_ms']:.2f} ms CPU/mint, peak in-flight {rp['cold_start_peak_inflight']}); graceful stop {rp['stop_s']:.2f} s")
    out.append(
        f"restart: load {rs['load_s']:.1f} s, recovered {rs['recovered']:,}; ready (all valid, /readyz) {fmt(rs['ready_since_daemon_s'], 2)} s after Daemon(), "
        f"{fmt(rs['ready_since_process_start_s'], 2)} s after process start"
    )
    first_round = rs["first_round_since_daemon_s"]
    out.append(
        "scheduler.first_round (gates systemd READY=1): "
        + (f"{first_round:.2f} s" if first_round is not None else f"not set within {rs['observe_s']:.0f} s")
        + f"; mints in the first {rs['observe_s']:.0f} s: {rs['mints_in_window']}; RSS {rs['rss_mb']:.0f} MB"
    )
    out.append("")
    out.append("== Targets")
    width = max(len(r[0]) for r in rows)
    for name, required, measured, met in rows:
        out.append(f"{'MET   ' if met else 'MISSED'}  {name:<{width}}  required {required:<10} measured {measured}")
    return "\n".join(out)


def growth_grid() -> str:
    """Tenants × token lifetime, one steady-state run each (60 s on the real clock);
    a size whose refresh rate this machine cannot hold is extrapolated from the
    largest measured run of its lifetime, and marked so."""
    lines = [
        "== Growth grid (steady state, 60 s per run; * = extrapolated, not measured)",
        f"{'tenants':>8}  {'lifetime':>8}  {'refreshes/s':>11}  {'CPU share':>9}  {'CPU/refresh ms':>14}  {'RSS MB':>7}  {'lag p99 ms':>10}  missed",
    ]
    for lifetime in GROWTH_LIFETIMES:
        measured: dict[str, Any] | None = None
        for jobs in GROWTH_TENANTS:
            rate = jobs / mean_refresh_interval(lifetime)
            if rate <= GROWTH_MAX_RATE:
                log(f"growth: {jobs} tenants, {lifetime} s tokens")
                args_ = scale_args(PROFILES["full"], jobs, reference=False, lifetime=lifetime, duration=60)
                measured = run_child("tests.bench.scale", args_, timeout=1800)
                m = measured
                lines.append(
                    f"{jobs:>8,}  {lifetime:>7}s  {m['refresh_rate_per_s']:>11.1f}  {m['cpu_share']:>9.0%}  "
                    f"{m['cpu_per_refresh_ms']:>14.2f}  {m['rss_steady_mb']:>7.0f}  {m['lag_ms']['p99']:>10.1f}  {m['missed']}"
                )
            elif measured is not None:
                # CPU scales with the refresh rate; RSS with the tenants (per-tenant
                # cost of the largest measured run).
                share = rate * measured["cpu_per_refresh_ms"] / 1000
                per_tenant = (measured["rss_steady_mb"] - measured["rss_before_daemon_mb"]) / measured["jobs"]
                rss = measured["rss_before_daemon_mb"] + per_tenant * jobs
                lines.append(
                    f"{jobs:>8,}  {lifetime:>7}s  {rate:>10.1f}*  {share:>8.0%}*  "
                    f"{measured['cpu_per_refresh_ms']:>13.2f}*  {rss:>6.0f}*  {'-':>10}  -"
                )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="smaller sizes, about 3 minutes")
    group.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI smoke test)")
    group.add_argument("--growth", action="store_true", help="only the growth grid, about 10 minutes")
    parser.add_argument("--server", choices=["fast", "emulator"], default="fast",
                        help="throughput server: the fast asyncio one (default) or OAuth2Emulator")
    args = parser.parse_args()
    if args.growth:
        print(growth_grid())
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    p = PROFILES[mode]
    started = time.monotonic()
    import refresher

    result: dict[str, Any] = {"mode": mode, "refresher": str(refresher.__file__)}
    log(f"mode {mode}: refresher from {refresher.__file__}")

    log(f"throughput: N={p['n']} at concurrency {p['concurrency']}")
    result["throughput"] = run_child(
        "tests.bench.throughput",
        ["--n", str(p["n"]), "--rounds", str(p["rounds"]), "--concurrency", p["concurrency"], "--server", args.server],
        timeout=600,
    )
    log(f"scale: {p['scale_jobs']} tenants for {p['duration']} s")
    result["scale"] = run_child("tests.bench.scale", scale_args(p, p["scale_jobs"], reference=True), timeout=900)
    growth = []
    if p["growth"]:
        log(f"growth: {p['growth']} tenants (concurrently)")
        call: Callable[[int], dict[str, Any]] = lambda jobs: run_child(  # noqa: E731
            "tests.bench.scale", scale_args(p, jobs, reference=False), timeout=900
        )
        with ThreadPoolExecutor(len(p["growth"])) as pool:
            growth = list(pool.map(call, p["growth"]))
    result["growth"] = [*growth, result["scale"]]
    result["checks"] = []
    for jobs, lifetime, duration, check in p["checks"]:
        log(f"scale check ({check}): {jobs} tenants, {lifetime} s tokens, {duration} s")
        args_ = scale_args(p, jobs, reference=check == "cpu", lifetime=lifetime, duration=duration)
        run = run_child("tests.bench.scale", args_, timeout=900)
        result["checks"].append({**run, "check": check})
    result["restart"], result["ratelimit"] = run_restart_and_ratelimit(p)
    result["elapsed_s"] = time.monotonic() - started
    rows = evaluate(result)
    result["targets"] = {name: met for name, _, _, met in rows}
    result["targets_met"] = sum(result["targets"].values())
    result["targets_total"] = len(rows)
    print(table(result, rows))
    print(f"\ntotal {result['elapsed_s']:.0f} s")
    print("BENCH " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
