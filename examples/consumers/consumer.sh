#!/bin/sh
# Consume a token from refresher in POSIX sh with curl: read the token file (format
# raw), report the token rejected (as after an HTTP 401), and reload the file until
# it holds the fresh token the daemon answered with.
# usage: consumer.sh TOKEN_FILE JOB [TENANT] [DAEMON_URL]
# Sends $REFRESHER_CONSUMER_TOKEN as the bearer secret when it is set.
set -eu
file=$1 job=$2 tenant=${3:-} daemon=${4:-http://127.0.0.1:9464}

# Read the whole file each time: refresher replaces it by rename, never in place.
read_token() { tr -d '\n' < "$file"; }

# The first 12 hex digits of the token's SHA-256: how the daemon names a token.
fingerprint() { printf %s "$1" | sha256sum | cut -c1-12; }

# Changes at every rewrite: each one renames a new file (a new inode) into place.
stamp() { stat -c '%i %Y' "$file" 2>/dev/null || echo gone; }

# POST /v1/tokens/{job}/refresh?rejected=FP[&tenant=T]; prints the fresh token's
# fingerprint; exits 3 when the daemon says the link itself is invalid (409).
report_rejected() {
  answer=$(curl -sS -X POST -G -w '\n%{http_code}' \
    ${REFRESHER_CONSUMER_TOKEN:+-H "Authorization: Bearer $REFRESHER_CONSUMER_TOKEN"} \
    --data-urlencode "rejected=$(fingerprint "$1")" \
    ${tenant:+--data-urlencode "tenant=$tenant"} \
    "$daemon/v1/tokens/$job/refresh")
  status=$(printf '%s\n' "$answer" | tail -n 1)
  [ "$status" = 409 ] && { echo "link invalid: stop calling" >&2; exit 3; }
  [ "$status" = 200 ] || { echo "report failed: HTTP $status" >&2; exit 1; }
  printf '%s\n' "$answer" | sed -n 's/.*"fingerprint": *"\([0-9a-f]*\)".*/\1/p'
}

# Poll the file (every 0.2 s, 30 s at most) until it holds the token $1 names.
wait_for() {
  last="" i=0
  while [ "$i" -lt 150 ]; do
    now=$(stamp)
    if [ "$now" != "$last" ]; then
      last=$now
      [ "$(fingerprint "$(read_token)")" = "$1" ] && return 0
    fi
    sleep 0.2
    i=$((i + 1))
  done
  echo "the file never held $1" >&2
  return 1
}

token=$(read_token)
echo "token $(fingerprint "$token")"
fresh=$(report_rejected "$token")
echo "answer $fresh"
wait_for "$fresh"
echo "reloaded $(fingerprint "$(read_token)")"
