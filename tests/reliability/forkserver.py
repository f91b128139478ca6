"""A zygote for the SIGKILL loop: import refresher once, then fork ``refresher run``.

Importing refresher costs ~1.7 s on the CI machine; a forked child runs the very same
entry point (`refresher.cli.main(["run", "--config", …])`) within milliseconds, so
the loop spends its time killing daemons, not importing them.

Line protocol on stdin, one answer line on stdout per command:

    warm <config>          build (not run) a daemon for <config> once   → "warm"
    spawn <config> <log>   fork a daemon writing its logs to <log>  → "<pid>"
    kill <pid>             SIGKILL it and reap it                   → "<exit code>"
    term <pid>             SIGTERM it and reap it                   → "<exit code>"
    quit                   SIGKILL every child left, exit
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import refresher.cli
import refresher.daemon
import refresher.providers.oauth2
import refresher.server


def child(config: str, log: str) -> None:
    code = 70
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        code = refresher.cli.main(["run", "--config", config])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def warm(config: str) -> None:
    """Do once, here, what every child would do first (lazy imports, validator and
    protocol setup) — without an event loop, so the zygote stays single-threaded."""
    import anyio._backends._asyncio  # noqa: F401

    from refresher.config import load_settings
    from refresher.daemon import Daemon
    from refresher.jobs import build_provider, build_runtimes
    from refresher.server import create_app, make_server

    settings = load_settings(config)
    daemon = Daemon(settings, serve_http=False)
    for job in settings.jobs:
        build_runtimes(job, build_provider(job, clients=daemon.clients, clock=daemon.clock))
    make_server(create_app(daemon.scheduler, daemon.metrics)).config.load()


def main() -> None:
    children: set[int] = set()
    for line in sys.stdin:
        command, *args = line.split()
        if command == "warm":
            warm(*args)
            print("warm", flush=True)
        elif command == "spawn":
            pid = os.fork()
            if pid == 0:
                child(*args)
            children.add(pid)
            print(pid, flush=True)
        elif command in ("kill", "term"):
            pid = int(args[0])
            os.kill(pid, signal.SIGKILL if command == "kill" else signal.SIGTERM)
            _, status = os.waitpid(pid, 0)
            children.discard(pid)
            print(os.waitstatus_to_exitcode(status), flush=True)
        elif command == "quit":
            break
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
