// Consume a token from refresher in Node.js (18 or later), no packages: read the token
// file (format raw), report the token rejected (as after an HTTP 401), and reload the
// file when it changes until it holds the fresh token the daemon answered with.
//
//   node consumer.js TOKEN_FILE JOB [TENANT] [DAEMON_URL]
//
// Sends $REFRESHER_CONSUMER_TOKEN as the bearer secret when it is set.
"use strict";
const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");

class LinkInvalidError extends Error {}

// The whole file at once: refresher replaces it by rename, never in place.
function readToken(file) {
  return fs.readFileSync(file, "ascii").trim();
}

// The first 12 hex digits of the token's SHA-256: how the daemon names a token.
function fingerprint(token) {
  return crypto.createHash("sha256").update(token).digest("hex").slice(0, 12);
}

// Calls onChange(token) now and whenever the file is replaced. The watch (inotify) is
// on the directory: refresher renames a new file over the old one, and a watch on the
// old file would never fire again.
function watchToken(file, onChange) {
  const name = path.basename(file);
  let last = null;
  const check = () => {
    let token;
    try {
      token = readToken(file);
    } catch {
      return; // between two renames, or removed: the next event tells
    }
    if (token !== last) {
      last = token;
      onChange(token);
    }
  };
  const watcher = fs.watch(path.dirname(file), (event, changed) => {
    if (changed === null || changed === name) check();
  });
  setImmediate(check);
  return watcher;
}

// POST /v1/tokens/{job}/refresh?rejected=FP[&tenant=T]; the fresh token's fingerprint.
async function reportRejected(daemon, job, token, tenant) {
  const query = new URLSearchParams({ rejected: fingerprint(token) });
  if (tenant) query.set("tenant", tenant);
  const secret = process.env.REFRESHER_CONSUMER_TOKEN;
  const headers = secret ? { Authorization: `Bearer ${secret}` } : {};
  const url = `${daemon}/v1/tokens/${encodeURIComponent(job)}/refresh?${query}`;
  const response = await fetch(url, { method: "POST", headers });
  if (response.status === 409) throw new LinkInvalidError(`${job} ${tenant}: the link is invalid`);
  if (!response.ok) throw new Error(`report failed: HTTP ${response.status}`);
  return (await response.json()).fingerprint;
}

async function main([file, job, tenant = "", daemon = "http://127.0.0.1:9464"]) {
  const token = readToken(file);
  console.log("token", fingerprint(token));
  const fresh = await reportRejected(daemon, job, token, tenant);
  console.log("answer", fresh);
  await new Promise((resolve, reject) => {
    const watcher = watchToken(file, (current) => {
      if (fingerprint(current) !== fresh) return;
      clearTimeout(timer);
      watcher.close();
      resolve();
    });
    const timer = setTimeout(() => {
      watcher.close();
      reject(new Error(`the file never held ${fresh}`));
    }, 30000);
  });
  console.log("reloaded", fresh);
}

main(process.argv.slice(2)).catch((error) => {
  console.error(error.message);
  process.exit(error instanceof LinkInvalidError ? 3 : 1);
});
