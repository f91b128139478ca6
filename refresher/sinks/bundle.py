"""Bundle sink: the tokens of many jobs and tenants in one file or Secret key.

Every (job, tenant) whose job lists the bundle among its sinks is a *member*
(`BundleMember`); one `Bundle` per output holds them all and writes the whole file.

Formats (`render`, `parse`):

* ``env`` — ``NAME=value`` lines: systemd's ``EnvironmentFile=``, ``docker
  --env-file``, a shell's ``set -a; . file``;
* ``dotenv`` — ``NAME="value"`` lines: dotenv libraries;
* ``json`` — one object: ``"job"`` or ``"job/tenant"`` → ``job``, ``tenant``,
  ``value``, ``token_type``, ``expires_at``, ``obtained_at``, ``fingerprint``.

In ``env`` and ``dotenv`` each variable follows a ``#`` comment naming its job and
tenant (percent-encoded like a path segment) with the token's type, expiry, issue
time and fingerprint — what a restart reads back; every consumer above skips
comments. Names follow `refresher.targets` (``{job}`` / ``{job}_{tenant}``, upper
case); a member whose name another member holds already is left out of the file
(logged, ``refresher_bundle_members_skipped``) until that one leaves. Tokens are
shell- and JSON-inert (`refresher.token`), and a tenant id reaches the file only
escaped, so no member can break the format.

A member whose token expired unreplaced, or that has none yet, follows the bundle's
``expired`` rule: ``keep`` (an expired token stays as it was; no token, no line),
``omit`` (left out until it has a valid token) or ``mark`` (listed with an empty
value — ``NAME=``, ``NAME=""``, ``"value": null`` — and ``state=expired`` or
``state=missing``). A member withdrawn (its tenant removed, ``on_expiry: remove``)
leaves the file at once; one whose job is no longer configured, at the next rewrite.

Writing: a change waits `BATCH_WINDOW` for the changes of other members (the tokens
of one refresh round arrive within milliseconds), then they are written together
in one atomic rewrite that every one of them waits for (and fails with). A rewrite
that would change nothing is not written. After each rewrite the daemon's
notifiers of the jobs whose tokens changed fire once (`Rewrite`), not once per
member. Before its first write a bundle reads its output back: a member keeps the
value it held until it has a new one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import anyio
import structlog

from refresher.clock import Clock
from refresher.config import BundleSinkConfig
from refresher.errors import LeadershipLostError, SinkError
from refresher.metrics import Metrics
from refresher.sinks.base import Announce, Output, Rewrite
from refresher.targets import Owner, describe_owner, path_segment
from refresher.token import Token, fingerprint, parse_rfc3339, rfc3339

log = structlog.get_logger("refresher.sinks.bundle")

#: How long a change waits for the others of its refresh round before the rewrite.
BATCH_WINDOW = 0.005
HEADER = "# Written by refresher: replaced as a whole whenever a token changes. Do not edit.\n"

_ABOUT = re.compile(r"^# (?P<name>[A-Za-z_][A-Za-z0-9_]*) (?P<fields>(?:[a-z_]+=\S* ?)+)$")


@dataclass(frozen=True)
class Entry:
    """One member as a file shows it: ``valid`` (its token, current or kept), or marked
    ``expired`` / ``missing`` (no usable value)."""

    owner: Owner
    name: str
    token: Token | None
    state: str = "valid"

    @property
    def value(self) -> str:
        return self.token.value if self.token is not None and self.state == "valid" else ""


@dataclass(eq=False)
class _Member:
    owner: Owner
    name: str
    provider_kind: str
    token: Token | None = None
    #: `token` is what the output held (re-read on every read-back), not ours yet.
    from_output: bool = True
    skipped: bool = False
    withdrawn: bool = False


@dataclass(eq=False)
class _Batch:
    done: anyio.Event = field(default_factory=anyio.Event)
    error: SinkError | None = None


class Bundle:
    """One bundle output and its members."""

    def __init__(
        self,
        config: BundleSinkConfig,
        output: Output,
        *,
        clock: Clock,
        metrics: Metrics,
        announce: Announce,
        window: float | None = None,
    ) -> None:
        self.config = config
        self.output = output
        self.target = output.target
        self.clock = clock
        self.announce = announce
        self.window = BATCH_WINDOW if window is None else window
        self._members: dict[Owner, _Member] = {}
        #: What the output holds, by member (None until read).
        self._held: dict[Owner, Entry] | None = None
        self._content: bytes | None = None
        self._stamp: object = None
        self._batch: _Batch | None = None
        self._lock = anyio.Lock()
        self._writes = metrics.bundle_writes.labels(self.target)
        self._skipped = metrics.bundle_members_skipped.labels(self.target)

    # ------------------------------------------------------------ members

    def join(self, job: str, tenant: str | None, provider_kind: str) -> BundleMember:
        """Make (job, tenant) a member (`TargetError` if it cannot have a name)."""
        owner = (job, tenant)
        member = _Member(owner, self.config.member_name(job=job, tenant=tenant), provider_kind)
        holder = self._holder(member.name)
        if holder is not None and holder.owner != owner:
            member.skipped = True
            log.warning(
                "bundle member left out: another member has its name",
                bundle=self.target,
                name=member.name,
                job=job,
                tenant=tenant,
                named=describe_owner(holder.owner),
            )
        self._members[owner] = member
        self._count_skipped()
        return BundleMember(self, owner)

    def leave(self, owner: Owner) -> bool:
        """(job, tenant) is no longer a member; a member left out for its name takes
        it (True: the file is due a rewrite to show it)."""
        member = self._members.pop(owner, None)
        if member is None or member.skipped:
            self._count_skipped()
            return False
        waiting = next(
            (m for m in self._members.values() if m.skipped and m.name == member.name), None
        )
        if waiting is not None:
            waiting.skipped = False
            log.info(
                "bundle member admitted: its name is free",
                bundle=self.target,
                name=waiting.name,
                job=waiting.owner[0],
                tenant=waiting.owner[1],
            )
        self._count_skipped()
        return waiting is not None and waiting.token is not None

    @property
    def empty(self) -> bool:
        return not self._members

    def _holder(self, name: str) -> _Member | None:
        return next((m for m in self._members.values() if m.name == name and not m.skipped), None)

    def _count_skipped(self) -> None:
        self._skipped.set(sum(m.skipped for m in self._members.values()))

    # ------------------------------------------------------------ what members do

    async def update(self, owner: Owner, token: Token | None) -> None:
        """A member's new token (None: withdrawn), written with its batch."""
        member = self._members.get(owner)
        if member is None:
            return
        member.token, member.from_output, member.withdrawn = token, False, token is None
        if not member.skipped:  # kept for when its name is free
            await self.commit()

    async def held(self, owner: Owner) -> Token | None:
        """The token the output holds for a member (read again if it changed since)."""
        stamp = self.output.stamp()
        if self._held is None or stamp is None or stamp != self._stamp:
            await self._load()
        assert self._held is not None
        entry = self._held.get(owner)
        token = entry.token if entry is not None and entry.state == "valid" else None
        member = self._members.get(owner)
        if member is None or member.skipped:
            return None
        if member.from_output:
            member.token = token
        return token

    async def commit(self) -> None:
        """Have every change made so far written, together with the others of its batch."""
        batch = self._batch
        if batch is not None:
            await batch.done.wait()
        else:
            batch = self._batch = _Batch()
            try:
                await anyio.sleep(self.window)
                async with self._lock:
                    if self._batch is batch:
                        self._batch = None  # later changes go to the next rewrite
                    await self._write()
            except SinkError as exc:
                batch.error = exc
            except Exception as exc:
                batch.error = SinkError(f"unexpected {type(exc).__name__}: {exc}", sink="bundle")
            except BaseException:
                batch.error = SinkError("the write was cancelled", sink="bundle")
                raise
            finally:
                if self._batch is batch:
                    self._batch = None
                batch.done.set()
        if batch.error is not None:
            # One instance per waiting task: each raise adds its own traceback.
            kind = (
                LeadershipLostError if isinstance(batch.error, LeadershipLostError) else SinkError
            )
            raise kind(str(batch.error), sink=batch.error.sink)

    # ------------------------------------------------------------ the file

    async def _load(self) -> None:
        self._stamp = self.output.stamp()
        content = await self.output.get()
        self._content = content
        self._held = parse(content, self.config.format) if content else {}

    async def _write(self) -> None:
        if self._held is None:
            await self._load()
        assert self._held is not None
        entries = self._entries(self.clock.now())
        content = render(entries, self.config.format)
        if content == self._content:
            return
        await self.output.put(content)
        before = self._held
        self._held = {e.owner: e for e in entries}
        self._content = content
        self._stamp = self.output.stamp()
        self._writes.inc()
        changed = {e.owner for e in entries if before.get(e.owner) != e}
        changed |= set(before) - set(self._held)
        kinds = {m.owner[0]: m.provider_kind for m in self._members.values()}
        jobs = tuple(sorted({(job, kinds[job]) for job, _ in changed if job in kinds}))
        if jobs:
            expiries = [e.token.expires_at for e in entries if e.token and e.token.expires_at]
            await self.announce(
                Rewrite(
                    target=self.target,
                    jobs=jobs,
                    fingerprint=fingerprint(content),
                    expires_at=rfc3339(min(expiries)) if expiries else None,
                )
            )

    def _entries(self, now: float) -> list[Entry]:
        """Every member as the file shows it now, ordered by job and tenant."""
        held = self._held or {}
        entries = []
        for member in sorted(self._members.values(), key=lambda m: (m.owner[0], m.owner[1] or "")):
            if member.skipped or member.withdrawn:
                continue
            if member.from_output and member.token is None and member.owner in held:
                member.token = held[member.owner].token
            token, rule = member.token, self.config.expired
            if token is not None and (rule == "keep" or token.is_valid(now)):
                entries.append(Entry(member.owner, member.name, token))
            elif rule == "mark":
                state = "missing" if token is None else "expired"
                entries.append(Entry(member.owner, member.name, token, state))
        return entries


class BundleMember:
    """One (job, tenant)'s part of a `Bundle`: a `TokenSink` (and `ExpiryAware`)."""

    kind = "bundle"

    def __init__(self, bundle: Bundle, owner: Owner) -> None:
        self.bundle = bundle
        self.owner = owner
        self.target = bundle.target

    @property
    def output(self) -> Output:
        return self.bundle.output

    async def write(self, token: Token) -> None:
        await self.bundle.update(self.owner, token)

    async def read_back(self) -> Token | None:
        return await self.bundle.held(self.owner)

    async def remove(self) -> None:
        await self.bundle.update(self.owner, None)

    async def expired(self) -> None:
        if self.bundle.config.expired != "keep":
            await self.bundle.commit()


# ---------------------------------------------------------------------------- formats


def render(entries: list[Entry], fmt: str) -> bytes:
    """The bundle file for `entries` in `fmt` (see the module docstring)."""
    if fmt == "json":
        document = {entry.name: _document(entry) for entry in entries}
        return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    lines = [HEADER]
    for entry in entries:
        about = " ".join(f"{key}={value}" for key, value in _about(entry).items())
        value = f'"{entry.value}"' if fmt == "dotenv" else entry.value
        lines.append(f"# {entry.name} {about}\n{entry.name}={value}\n")
    return "".join(lines).encode()


def _about(entry: Entry) -> dict[str, str]:
    """What the comment above a variable says of it."""
    job, tenant = entry.owner
    about = {"job": job}
    if tenant is not None:
        about["tenant"] = path_segment(tenant)
    if entry.state != "valid":
        about["state"] = entry.state
    token = entry.token
    if token is not None:
        about["type"] = token.token_type
        about["expires_at"] = rfc3339(token.expires_at) or ""
        about["obtained_at"] = rfc3339(token.obtained_at) or ""
        if entry.state == "valid":
            about["fingerprint"] = token.fingerprint()
    return about


def _document(entry: Entry) -> dict[str, Any]:
    token = entry.token
    document: dict[str, Any] = {
        "job": entry.owner[0],
        "tenant": entry.owner[1],
        "value": entry.value or None,
        "token_type": token.token_type if token else None,
        "expires_at": rfc3339(token.expires_at) if token else None,
        "obtained_at": rfc3339(token.obtained_at) if token else None,
        "fingerprint": token.fingerprint() if token and entry.state == "valid" else None,
    }
    if entry.state != "valid":
        document["state"] = entry.state
    return document


def parse(content: bytes, fmt: str) -> dict[Owner, Entry]:
    """The members a bundle file holds (what cannot be read is left out)."""
    try:
        text = content.decode()
        if fmt == "json":
            return _parse_json(text)
    except (UnicodeDecodeError, ValueError):
        return {}
    entries: dict[Owner, Entry] = {}
    about: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        match = _ABOUT.match(line)
        if match:
            name = match["name"]
            about = dict(item.split("=", 1) for item in match["fields"].split())
            continue
        key, sep, value = line.partition("=")
        if not sep or key != name or "job" not in about:
            continue
        owner = (about["job"], unquote(about["tenant"]) if "tenant" in about else None)
        if fmt == "dotenv":
            value = value.removeprefix('"').removesuffix('"')
        state = about.get("state", "valid")
        token = _recovered(
            value, about.get("type"), about.get("expires_at"), about.get("obtained_at")
        )
        entries[owner] = Entry(owner, name, token if state == "valid" else None, state)
        name = ""
    return entries


def _parse_json(text: str) -> dict[Owner, Entry]:
    document = json.loads(text)
    entries: dict[Owner, Entry] = {}
    if not isinstance(document, dict):
        return entries
    for name, item in document.items():
        if not isinstance(item, dict) or not isinstance(item.get("job"), str):
            continue
        tenant = item.get("tenant")
        owner = (item["job"], tenant if isinstance(tenant, str) else None)
        state = item.get("state", "valid")
        value = item.get("value")
        fields = [item.get(k) for k in ("token_type", "expires_at", "obtained_at")]
        texts = [f if isinstance(f, str) else None for f in fields]
        token = _recovered(value, *texts) if isinstance(value, str) and state == "valid" else None
        entries[owner] = Entry(owner, name, token, state if isinstance(state, str) else "valid")
    return entries


def _recovered(
    value: str, token_type: str | None, expires_at: str | None, obtained_at: str | None
) -> Token | None:
    if not value:
        return None
    try:
        return Token.recovered(
            value,
            token_type=token_type or "Bearer",
            expires_at=parse_rfc3339(expires_at) if expires_at else None,
            obtained_at=parse_rfc3339(obtained_at) if obtained_at else None,
        )
    except ValueError:
        return None
