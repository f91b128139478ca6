#!/bin/sh
# Tell refresher that the token in a JSON file sink was rejected (HTTP 401).
# usage: report-rejected.sh TOKEN_FILE JOB [TENANT] [DAEMON_URL]
# Prints the daemon's answer: {"fingerprint": ..., "expires_at": ..., "minted": ...}
set -eu
file=$1 job=$2 tenant=${3:-} daemon=${4:-http://127.0.0.1:9464}
# The fingerprint is the first 12 hex digits of the token's SHA-256.
fp=$(sed -n 's/^ *"value": "\(.*\)",*$/\1/p' "$file" | tr -d '\n' | sha256sum | cut -c1-12)
curl -sS --fail-with-body -X POST ${REFRESHER_CONSUMER_TOKEN:+-H "Authorization: Bearer $REFRESHER_CONSUMER_TOKEN"} \
  "$daemon/v1/tokens/$job/refresh?rejected=$fp${tenant:+&tenant=$tenant}"
