"""Command line: ``refresher run | once | check | status | demo``."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from refresher import __version__
from refresher.config import (
    BundleSinkConfig,
    FileSinkConfig,
    JobConfig,
    KubernetesSinkConfig,
    OutputConfig,
    Settings,
    bundle_problems,
    load_settings,
)
from refresher.errors import ConfigError, ListenError, SinkOwnedError
from refresher.logging import Redactor, configure_logging

#: EXIT_CONFIG also when another refresher owns a sink directory: retrying cannot help.
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
#: `refresher status`: the daemon could not be asked (2 is argparse's usage error).
EXIT_UNREACHABLE = 3


def _config_path(args: argparse.Namespace) -> str | None:
    return args.config or os.environ.get("REFRESHER_CONFIG")


def _load(args: argparse.Namespace) -> Settings:
    path = _config_path(args)
    if path is None:
        raise ConfigError(["--config: no config file given (or set REFRESHER_CONFIG)"])
    return load_settings(path, check_files=not getattr(args, "no_files", False))


def _setup_logging(settings: Settings, redactor: Redactor) -> None:
    configure_logging(redactor, level=settings.logging.level, fmt=settings.logging.format)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        settings = _load(args)
    except ConfigError as exc:
        print(f"config invalid: {len(exc.errors)} error(s)", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    collisions, too_large = bundle_problems(settings.jobs, _known_tenants)
    if too_large:
        print(f"config invalid: {len(too_large)} error(s)", file=sys.stderr)
        for line in too_large:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    print(describe_plan(settings))
    for warning in config_warnings(settings):
        print(f"warning: {warning}")
    for collision in collisions:
        print(f"warning: {collision} (the later one is left out of the bundle)")
    if args.online:
        _setup_logging(settings, Redactor())
        discovered = anyio.run(_discovery_report, settings)
        # Redeeming a refresh token rotates it: a check must not spend the daemon's.
        minted = []
        for job in settings.jobs:
            if getattr(job.provider, "grant", None) == "refresh_token":
                print(
                    f"- job {job.name}: grant refresh_token not redeemed by check --online "
                    "(that would rotate the daemon's refresh token)"
                )
            else:
                minted.append(job)
        fetched = _run_once(settings.model_copy(update={"jobs": minted}), write=False)
        return fetched if discovered else max(fetched, EXIT_FAILED)
    return EXIT_OK


def _known_tenants(job: JobConfig) -> list[str | None]:
    """The tenants a job has now, its ``tenants_file`` included when it can be read."""
    from refresher.jobs import tenants_of

    try:
        return tenants_of(job)
    except OSError:
        return job.static_tenants()


async def _discovery_report(settings: Settings) -> bool:
    """Print what each ``oauth2`` job with an ``issuer`` discovers; False if any failed."""
    from refresher.clock import SystemClock
    from refresher.errors import ProviderError
    from refresher.providers.base import HTTPClients
    from refresher.providers.oauth2 import OAuth2Provider, OAuth2ProviderConfig, discovery_report

    ok = True
    clients = HTTPClients()
    try:
        for job in settings.jobs:
            config = job.provider
            if not isinstance(config, OAuth2ProviderConfig) or config.issuer is None:
                continue
            provider = OAuth2Provider(config, clients=clients, clock=SystemClock())
            try:
                lines = discovery_report(await provider.discover(), config)
            except ProviderError as exc:
                ok = False
                lines = [f"discovery FAILED: {exc}"]
            print(f"- job {job.name}: " + "\n    ".join(lines))
    finally:
        await clients.aclose()
    return ok


def describe_plan(settings: Settings) -> str:
    """Human-readable plan of what the daemon will do with this config."""
    from refresher.jobs import tenants_of

    policy = settings.refresh
    lines = [
        f"config OK: {len(settings.jobs)} job(s); listening on {settings.server.listen}",
        f"refresh policy: at {policy.refresh_at:.0%} of lifetime, at least "
        f"{policy.min_remaining:g}s before expiry, jitter ±{policy.jitter:.0%}, "
        f"backoff {policy.backoff.initial:g}s..{policy.backoff.max:g}s, "
        f"concurrency {policy.concurrency}",
    ]
    for job in settings.jobs:
        provider = job.provider
        where = getattr(provider, "token_url", None) or getattr(provider, "base_url", "")
        lines.append(f"- job {job.name}: provider {provider.kind} {where}".rstrip())
        try:
            tenants = [t for t in tenants_of(job) if t is not None]
        except OSError as exc:  # `check --no-files`: the tenants_file may not be there
            tenants = ["{tenant}"]
            lines.append(f"    tenants: from {exc.filename} (not read: {exc.strerror})")
        else:
            if tenants:
                lines.append(f"    tenants: {len(tenants)}")
        for sink in job.sinks:
            if isinstance(sink, KubernetesSinkConfig):
                target = f"{sink.secret}#{sink.key_template(None)}"
            elif isinstance(sink, FileSinkConfig):
                target = sink.path
            elif isinstance(sink, BundleSinkConfig):
                target = f"{sink.where} ({sink.format})"
            else:
                target = f"{sink.where} from {sink.template}"
            lines.append(f"    sink {sink.kind}: {target.replace('{job}', job.name)}")
    return "\n".join(lines)


def config_warnings(settings: Settings) -> list[str]:
    """What is valid but probably not meant: loose token file modes, sink directories
    that do not exist yet, ``tenants_file`` lines the daemon will skip, Gooclaim tokens
    whose signature nobody verifies, a ``state_dir`` a reboot empties, deprecated keys."""
    warnings = []
    for index, job in enumerate(settings.jobs):
        warnings += _provider_warnings(f"jobs[{index}]", job)
        for number, sink in enumerate(job.sinks):
            # Bundle and template files hold tokens too.
            if isinstance(sink, FileSinkConfig | OutputConfig) and sink.path is not None:
                where = f"jobs[{index}].sinks[{number}] ({job.name})"
                warnings += _file_sink_warnings(where, sink.path, sink.mode, job.name)
    return warnings


def _provider_warnings(where: str, job: JobConfig) -> list[str]:
    from refresher.providers.debitura import DebituraProviderConfig
    from refresher.providers.dutyclaims import DutyClaimsProviderConfig
    from refresher.providers.gooclaim import GooclaimProviderConfig
    from refresher.providers.oauth2 import OAuth2ProviderConfig
    from refresher.sinks.file import memory_backed

    provider, warnings = job.provider, []
    state_dir = provider.state_dir if isinstance(provider, OAuth2ProviderConfig) else None
    if state_dir is not None and memory_backed(str(state_dir)):
        warnings.append(
            f"{where}.provider.state_dir ({job.name}): {state_dir} is on a memory file "
            "system: a reboot loses the rotated refresh token (use /var/lib/...)"
        )
    if isinstance(provider, GooclaimProviderConfig) and not (
        provider.public_key_file or provider.jwks_url
    ):
        checked = "alg, aud, exp, sub" + (", iss" if provider.issuer else "")
        checked += ", tenant_id" if provider.tenant_id else ""
        warnings.append(
            f"{where}.provider ({job.name}): token signatures are NOT verified "
            f"(no public_key_file or jwks_url); only {checked} are checked"
        )
    deprecated = getattr(provider, "sandbox_on_production_host", None)
    if isinstance(provider, DutyClaimsProviderConfig) and deprecated is not None:
        warnings.append(
            f"{where}.provider.sandbox_on_production_host ({job.name}): deprecated "
            "and ignored (the sandbox token endpoint is on api.dutyclaims.com); remove it"
        )
    if isinstance(provider, DebituraProviderConfig) and provider.tenants_file:
        try:
            rejected = provider.tenant_lines().rejected
        except OSError as exc:
            rejected = [f"{provider.tenants_file}: {exc.strerror or exc}"]
        warnings.extend(f"{where} ({job.name}): skipped: {r}" for r in rejected)
    return warnings


def _file_sink_warnings(where: str, path: str, mode: int, job: str) -> list[str]:
    from refresher.targets import template_directory

    warnings = []
    if mode & 0o022:
        warnings.append(
            f"{where}: mode {mode:04o} lets other users replace the token "
            "file's content (use 0600 or 0640)"
        )
    elif mode & 0o004:
        warnings.append(f"{where}: mode {mode:04o} lets every user read the token")
    directory = template_directory(path.replace("{job}", job)) or "."
    if not os.path.isdir(directory):
        warnings.append(
            f"{where}: directory {directory} does not exist yet (writes fail and are "
            "retried until it does)"
        )
    return warnings


def _run_once(settings: Settings, *, write: bool = True) -> int:
    from refresher.daemon import Daemon

    redactor = Redactor()
    _setup_logging(settings, redactor)
    daemon = Daemon(settings, redactor=redactor, serve_http=False)
    try:
        ok = anyio.run(functools.partial(daemon.refresh_all_once, write=write))
    except SinkOwnedError as exc:
        print(f"refusing to run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        return _config_failed(exc)
    return EXIT_OK if ok else EXIT_FAILED


def _config_failed(exc: ConfigError) -> int:
    for line in exc.errors:
        print(f"config error: {line}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_once(args: argparse.Namespace) -> int:
    try:
        settings = _load(args)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"config error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    return _run_once(settings)


def cmd_run(args: argparse.Namespace) -> int:
    from refresher.daemon import Daemon

    try:
        settings = _load(args)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"config error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    redactor = Redactor()
    _setup_logging(settings, redactor)
    daemon = Daemon(settings, redactor=redactor, config_path=Path(_config_path(args) or ""))
    try:
        anyio.run(daemon.serve_forever)
    except ListenError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except SinkOwnedError as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        return _config_failed(exc)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import httpx2

    url = args.url.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    try:
        response = httpx2.get(f"{url}/v1/tokens", timeout=5)
        response.raise_for_status()
        jobs = _status_entries(response.json())
    except (httpx2.HTTPError, ValueError) as exc:
        print(f"cannot read status from {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(jobs, indent=2))
    else:
        print(format_status(jobs))
    return EXIT_OK if all(j.get("valid") for j in jobs) else EXIT_FAILED


def _status_entries(body: object) -> list[dict[str, object]]:
    """``{"jobs": [{"job": ..., ...}, ...]}`` from /v1/tokens, or ValueError."""
    jobs = body.get("jobs") if isinstance(body, dict) else None
    if not isinstance(jobs, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("job"), str) for entry in jobs
    ):
        raise ValueError("not a refresher /v1/tokens answer")
    return jobs


def format_status(jobs: list[dict[str, object]]) -> str:
    """The status table: one row per job, tenants aggregated."""
    rows: dict[str, dict[str, object]] = {}
    for entry in jobs:
        name = str(entry["job"])
        row = rows.setdefault(
            name,
            {
                "tenants": 0,
                "valid": 0,
                "state": "valid",
                "expires_in": None,
                "last_success": None,
                "last_error": None,
            },
        )
        row["tenants"] = int(str(row["tenants"])) + (1 if entry.get("tenant") else 0)
        row["valid"] = int(str(row["valid"])) + (1 if entry.get("valid") else 0)
        if entry.get("state") != "valid":
            row["state"] = entry.get("state")
        exp = entry.get("expires_in")
        if isinstance(exp, (int, float)) and (
            row["expires_in"] is None or exp < float(str(row["expires_in"]))
        ):
            row["expires_in"] = exp
        if entry.get("last_success_at"):
            row["last_success"] = max(str(row["last_success"] or ""), str(entry["last_success_at"]))
        if entry.get("last_error"):
            row["last_error"] = entry["last_error"]
    header = (
        f"{'JOB':<24} {'TENANTS':>7} {'STATE':<13} {'EXPIRES IN':>10}  "
        f"{'LAST SUCCESS':<20}  LAST ERROR"
    )
    lines = [header]
    for name, row in rows.items():
        exp = row["expires_in"]
        exp_text = f"{float(str(exp)):.0f}s" if exp is not None else "-"
        tenants = f"{row['valid']}/{row['tenants']}" if row["tenants"] else "-"
        lines.append(
            f"{name:<24} {tenants:>7} {row['state']!s:<13} {exp_text:>10}  "
            f"{row['last_success'] or '-'!s:<20}  {row['last_error'] or '-'}"
        )
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from refresher.demo import run_demo

    return run_demo(tokens_dir=Path(args.tokens_dir), listen=args.listen, lifetime=args.lifetime)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refresher", description=__doc__)
    parser.add_argument(
        "--version",
        action="version",
        version=f"refresher {__version__}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", "-c", metavar="FILE", help="YAML config file (default: $REFRESHER_CONFIG)"
        )

    p = sub.add_parser("run", help="run the daemon", description="Run the daemon.")
    with_config(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "once",
        help="refresh every job once, write sinks, exit 1 if any failed",
        description="Refresh every job once and write its sinks; exit 1 if any failed.",
    )
    with_config(p)
    p.set_defaults(func=cmd_once)
    p = sub.add_parser(
        "check",
        help="validate the config and print the plan",
        description="Validate the config and print the plan; exit 2 on errors.",
    )
    with_config(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--online", action="store_true", help="also fetch each token once (nothing is written)"
    )
    how.add_argument(
        "--no-files",
        action="store_true",
        help="do not require the files the config names (*_file, kubeconfig, ...) to exist: "
        "validate a config in CI or GitOps, away from its secrets",
    )
    p.set_defaults(func=cmd_check)
    p = sub.add_parser(
        "status",
        help="show the status of a running daemon",
        description="Show the status of a running daemon. Exit status: 0 every job valid, "
        "1 a job not valid, 2 usage error, 3 daemon unreachable or its answer unreadable.",
    )
    p.add_argument(
        "--url",
        default="127.0.0.1:9464",
        help="the daemon's listen address or URL (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the raw per-job status as JSON")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "demo",
        help="run emulated providers and a daemon against them",
        description="Run emulated providers and a daemon against them; Ctrl-C stops.",
    )
    p.add_argument(
        "--tokens-dir",
        default="tokens",
        metavar="DIR",
        help="where the demo writes its tokens (default: %(default)s)",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:9464",
        metavar="HOST:PORT",
        help="the demo daemon's metrics/status address (default: %(default)s)",
    )
    p.add_argument(
        "--lifetime",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="token lifetime in seconds (default: %(default)s)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_OK
