"""structlog setup with a redaction processor.

Every log line passes `Redactor`, which masks (a) values of keys named like a
credential (``token``, ``secret``, ``password``, ``authorization``, ``api_key`` …),
(b) any value equal to, or containing, a secret or token refresher knows about, and
(c) anything shaped like a JWT or a ``Bearer`` credential. A masked value becomes
``[redacted:<fingerprint>]`` so lines stay correlatable without being useful to an
attacker.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import sys
import threading
from collections.abc import Hashable, MutableMapping
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

import structlog

from refresher.token import fingerprint

_SENSITIVE_KEY = re.compile(
    r"(^|_)(token|access_?token|secret|password|passwd|authorization|api_?key|xapikey|credential)s?$",
    re.IGNORECASE,
)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def mask(value: str) -> str:
    return f"[redacted:{fingerprint(value)}]"


#: Encoded forms shorter than this are not searched for: they would mask chance matches.
MIN_FORM_LENGTH = 8


def secret_forms(value: str) -> set[str]:
    """`value` as it may appear in text echoed back by a server or a library: as is,
    percent-encoded (a form body), and base64 (HTTP Basic, or a base64 blob holding
    it at any offset; standard and URL-safe alphabets)."""
    forms = {value, quote(value, safe=""), quote_plus(value)}
    raw = value.encode("utf-8", "surrogatepass")
    for lead in range(3):
        encoded = base64.b64encode(b"\0" * lead + raw).decode()
        # The characters that depend on `value`'s bytes only, wherever it sits.
        first = -(-8 * lead // 6)
        last = 8 * (lead + len(raw)) // 6
        cores = [encoded[first:last]]
        if lead == 0:
            cores += [encoded, encoded.rstrip("=")]
        for core in cores:
            forms.add(core)
            forms.add(core.replace("+", "-").replace("/", "_"))
    return {form for form in forms if form == value or len(form) >= MIN_FORM_LENGTH}


#: Tokens remembered per (job, tenant): the current one and the one before it, which
#: consumers may still present and errors may still echo.
TOKENS_PER_OWNER = 2


class Redactor:
    """Knows the secrets and recent tokens, and scrubs them from log events.

    Credentials (few, long-lived) are searched as substrings; tokens (possibly
    thousands) are matched exactly and, being JWTs or bearer strings in practice,
    also caught by pattern. Token memory is bounded by its owners: at most
    `TOKENS_PER_OWNER` per (job, tenant), forgotten with the owner.
    """

    #: Values kept per slot of `add_secret`: the current one and the one before it.
    SLOT_DEPTH = 2

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()
        #: Secrets that rotate at run time (refresh tokens, assertions read from
        #: files), by slot: only the newest `SLOT_DEPTH` of each are searched for.
        self._slots: dict[str, list[str]] = {}
        self._fixed: set[str] = set()
        #: owner → hashes of its recent tokens, newest first. Hashes, not the tokens:
        #: memory per token stays small whatever its length; a collision only masks.
        self._recent: dict[Hashable, tuple[int, ...]] = {}
        #: hash → how many owners remember it (equal tokens across tenants are rare).
        self._tokens: dict[int, int] = {}
        self._lock = threading.Lock()
        #: Key → sensitive? Log keys come from code, so this stays small (bounded).
        self._sensitive_keys: dict[str, bool] = {}

    @property
    def remembered_tokens(self) -> int:
        return len(self._tokens)

    def add_secret(self, value: str, *, slot: str | None = None) -> None:
        """Remember a secret, and the forms it travels in (see `secret_forms`).

        A value given a `slot` replaces the oldest one of that slot beyond
        `SLOT_DEPTH`: a refresh token rotated hourly for a year stays two entries.
        """
        if len(value) < 4:
            return
        with self._lock:
            if slot is None:
                if value in self._fixed:
                    return
                self._fixed.add(value)
            else:
                held = self._slots.setdefault(slot, [])
                if value in held:
                    return
                held.append(value)
                del held[: -self.SLOT_DEPTH]
            values = self._fixed.union(*self._slots.values())
            forms = set().union(*(secret_forms(v) for v in values))
            # Replaced, never mutated: `scrub` reads it without the lock. Longest
            # first, so a form is masked whole before a shorter one inside it.
            self._secrets = tuple(sorted(forms, key=len, reverse=True))

    def add_token(self, value: str, owner: Hashable) -> None:
        """Remember `owner`'s newest token; its oldest beyond `TOKENS_PER_OWNER` goes."""
        key = hash(value)
        with self._lock:
            before = self._recent.get(owner, ())
            if before[:1] == (key,):
                return
            kept = (key, *(k for k in before if k != key))[:TOKENS_PER_OWNER]
            self._recent[owner] = kept
            self._recount(kept, before)

    def forget(self, owner: Hashable) -> None:
        """`owner` is gone (job removed, tenant dropped): so is its token memory."""
        with self._lock:
            self._recount((), self._recent.pop(owner, ()))

    def _recount(self, kept: tuple[int, ...], before: tuple[int, ...]) -> None:
        for key in kept:
            if key not in before:
                self._tokens[key] = self._tokens.get(key, 0) + 1
        for key in before:
            if key not in kept:
                if self._tokens[key] > 1:
                    self._tokens[key] -= 1
                else:
                    del self._tokens[key]

    def scrub(self, text: str) -> str:
        """`text` with every known secret and token masked, and anything that is not
        valid Unicode (a lone surrogate from a provider's JSON) escaped."""
        # Runs for every string of every log line: cheap checks before regexes.
        # (Membership tests on a dict are atomic; the lock guards only mutation.)
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError:
                text = text.encode("utf-8", "backslashreplace").decode()
        if hash(text) in self._tokens or text in self._secrets:
            return mask(text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, mask(secret))
        if "eyJ" in text:
            text = _JWT.sub(lambda m: mask(m.group(0)), text)
        if len(text) >= 14:  # "basic" + space + 8 characters, at the least
            text = _BEARER.sub(lambda m: f"{m.group(1)} {mask(m.group(0))}", text)
        return text

    def _sensitive(self, key: str) -> bool:
        found = self._sensitive_keys.get(key)
        if found is None:
            found = bool(_SENSITIVE_KEY.search(key))
            if len(self._sensitive_keys) < 4096:
                self._sensitive_keys[key] = found
        return found

    def _value(self, key: str, value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if self._sensitive(key):
            return mask(str(value))
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        if isinstance(value, dict):
            return {k: self._value(str(k), v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._value(key, v) for v in value]
        return value

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            event_dict[key] = self._value(key, event_dict[key])
        return event_dict


#: The redactor of this process's log output (`configure_logging` installs it).
_active: Redactor | None = None


def remember_secret(value: str, *, slot: str | None = None) -> None:
    """Teach the redactor of the log output a secret learned at run time: a rotated
    refresh token, an assertion or a key read from a file (see `Redactor.add_secret`)."""
    if _active is not None:
        _active.add_secret(value, slot=slot)


#: syslog priority of each structlog level name (the sd-daemon(3) line prefixes).
SYSLOG_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}


def is_journal(stream: TextIO) -> bool:
    """Whether `stream` is systemd's journal: systemd sets ``JOURNAL_STREAM`` to the
    ``<device>:<inode>`` of the stream it connected; a process that inherited the
    variable but writes elsewhere (a redirect, a pipe) does not match."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        found = os.fstat(stream.fileno())
    except (ValueError, OSError, io.UnsupportedOperation, AttributeError):
        return False  # unset, malformed, or a stream without a file: not the journal
    return (found.st_dev, found.st_ino) == (device, inode)


class JournalPriority:
    """Wraps a renderer: every line of an event starts with its syslog priority
    (``<3>`` for errors …), which journald strips and stores as the entry's PRIORITY,
    so ``journalctl -p err`` finds the errors."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        # Read before rendering: the console renderer pops `level`.
        priority = SYSLOG_PRIORITY.get(str(event_dict.get("level", method_name)), 6)
        rendered = str(self._renderer(logger, method_name, event_dict))
        return "\n".join(f"<{priority}>{line}" for line in rendered.split("\n"))


def configure_logging(
    redactor: Redactor,
    *,
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
) -> None:
    """Install structlog's pipeline: context, level, time, redaction, rendering.

    Tracebacks are rendered to text *before* redaction, so secrets in exception
    messages are scrubbed too. Writing to the journal (`is_journal`), lines carry
    their syslog priority and no timestamp: journald stamps every entry itself.
    """
    global _active
    _active = redactor
    out = stream or sys.stderr
    journal = is_journal(out)
    json_output = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    stamp: list[Any] = [] if journal else [structlog.processors.TimeStamper(fmt="iso", utc=True)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *stamp,
            structlog.processors.format_exc_info,
            redactor,
            JournalPriority(renderer) if journal else renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(out),  # PrintLogger's print() is slower
        cache_logger_on_first_use=False,
    )
