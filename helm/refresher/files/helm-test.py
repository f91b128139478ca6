"""`helm test`: the release answers on /readyz (200) and /metrics (200, refresher metrics).

Runs in the refresher image with its Python and the standard library only; the chart
passes it as `python -c`. REFRESHER_URL is the Service URL. Exit 0 on success, else 1.
"""

import os
import sys
import urllib.error
import urllib.request

BASE = os.environ["REFRESHER_URL"].rstrip("/")
if not BASE.startswith(("http://", "https://")):
    sys.exit(f"REFRESHER_URL must be an http(s) URL, got {BASE!r}")


def get(path):
    try:
        with urllib.request.urlopen(BASE + path, timeout=10) as response:  # noqa: S310 (http(s) only, checked above)
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return None, str(exc)


failed = False
status, body = get("/readyz")
if status == 200:
    print("GET /readyz: 200")
else:
    print(f"GET /readyz: {status}: {body[:500]}")
    failed = True
status, body = get("/metrics")
if status == 200 and "refresher_build_info" in body:
    print("GET /metrics: 200 with refresher metrics")
else:
    print(f"GET /metrics: {status}, refresher_build_info missing: {body[:200]}")
    failed = True
sys.exit(1 if failed else 0)
