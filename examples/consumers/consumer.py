"""Consume a token from refresher with the Python standard library: read the token
file (format raw), report the token rejected (as after an HTTP 401), and reload the
file when it changes until it holds the fresh token the daemon answered with.

    python3 consumer.py TOKEN_FILE JOB [TENANT] [DAEMON_URL]

Sends $REFRESHER_CONSUMER_TOKEN as the bearer secret when it is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator


class LinkInvalidError(RuntimeError):
    """The daemon says the partner rejected a fresh token too (409): stop calling."""


def read_token(path: str) -> str:
    """The whole file at once: refresher replaces it by rename, never in place."""
    with open(path, encoding="ascii") as file:
        return file.read().strip()


def fingerprint(token: str) -> str:
    """The first 12 hex digits of the token's SHA-256: how the daemon names a token."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def changes(path: str, interval: float = 0.2, timeout: float | None = None) -> Iterator[str]:
    """The token, then again after every rewrite (for `timeout` seconds, or forever):
    each rewrite renames a new file (a new inode, a new mtime) into place, so polling
    os.stat sees it."""
    last = None
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        try:
            info = os.stat(path)
            stamp = (info.st_ino, info.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp != last:
            last = stamp
            yield read_token(path)
        time.sleep(interval)


def report_rejected(daemon: str, job: str, token: str, tenant: str | None = None) -> str:
    """POST /v1/tokens/{job}/refresh?rejected=FP[&tenant=T]; the fresh token's fingerprint."""
    if not daemon.startswith(("http://", "https://")):
        raise ValueError(f"DAEMON_URL must be http:// or https://, not {daemon!r}")
    query = {"rejected": fingerprint(token), **({"tenant": tenant} if tenant else {})}
    url = f"{daemon}/v1/tokens/{urllib.parse.quote(job)}/refresh?{urllib.parse.urlencode(query)}"
    request = urllib.request.Request(url, method="POST")  # noqa: S310 (scheme checked)
    if os.environ.get("REFRESHER_CONSUMER_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['REFRESHER_CONSUMER_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return str(json.load(response)["fingerprint"])
    except urllib.error.HTTPError as error:
        if error.code == 409:
            raise LinkInvalidError(f"{job} {tenant or ''}: the link is invalid") from None
        raise


def main(argv: list[str]) -> int:
    path, job = argv[0], argv[1]
    tenant = argv[2] if len(argv) > 2 and argv[2] else None
    daemon = argv[3] if len(argv) > 3 else "http://127.0.0.1:9464"
    token = read_token(path)
    print("token", fingerprint(token), flush=True)
    fresh = report_rejected(daemon, job, token, tenant)
    print("answer", fresh, flush=True)
    for token in changes(path, timeout=30):
        if fingerprint(token) == fresh:
            print("reloaded", fresh, flush=True)
            return 0
    print(f"the file never held {fresh}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
