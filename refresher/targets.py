"""How job and tenant names become file paths and Kubernetes Secret keys.

A tenant id is the partner's own (Debitura's ``externalTenantId`` is free-form), so
it travels on the wire exactly as configured. What it may never do is choose where
a token lands. The rules, one per kind of target:

* **Tenant ids** are 1-200 characters of valid Unicode with no control characters
  (NUL, line breaks, tabs, DEL, C1) and no lone surrogates; anything else is refused
  wherever the id enters (config, ``tenants_file`` line, reload).
* **File paths**: ``{tenant}`` is replaced by its *path segment*: every character
  outside ``A-Z a-z 0-9 - _ .`` is percent-encoded as UTF-8 (``%`` itself too, so the
  mapping is one-to-one), and a leading ``.`` becomes ``%2E`` (no hidden files, no
  ``.``/``..``). ``{job}`` is a job name, already restricted to a safe alphabet. The
  expanded path must stay inside the directory its template names (the part before
  the first placeholder) and its file name must fit in 255 bytes.
* **Secret keys**: a key is used as written, never escaped; it must be a valid
  Secret data key (``[-._a-zA-Z0-9]``, at most 240 characters so the ``.expires_at``
  companion key fits in 253, not ``.``, ``..`` or starting with ``..``). A tenant that
  would make an invalid key is refused, and two tokens whose keys (or companion
  keys) collide in one Secret are refused too.
* **Bundle variable names** (``env`` and ``dotenv`` bundles): a member's variable is
  its sink's ``name`` with ``{job}`` and ``{tenant}`` replaced by their *name segment*
  (default ``{job}`` for a single-token job, ``{job}_{tenant}`` per tenant). The
  segment is the text with ASCII letters upper-cased, digits kept and every other
  character replaced by ``_``; a name that would start with a digit gets a leading
  ``_``. The rule is readable, not one-to-one (``acme-001`` and ``acme.001`` are both
  ``ACME_001``): two members of one bundle with the same name are a configuration
  error when both are known from the config, and the later one is left out of the
  bundle (logged and counted) when a ``tenants_file`` brings it at run time.

One writer per target: two sinks that resolve to the same file or Secret key are an
error naming both, unless they are members of the same bundle (`SharedTarget`).
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import quote

MAX_TENANT_LENGTH = 200
MAX_FILE_NAME_BYTES = 255
MAX_SECRET_KEY_LENGTH = 253 - len(".expires_at")
#: The companion data keys a Secret sink may write (and always removes) beside its key.
SECRET_KEY_SUFFIXES = ("", ".expires_at", ".token_type")

_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_NAME_OUTSIDE = re.compile(r"[^A-Z0-9_]")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SAFE_SEGMENT = "-_."


class TargetError(ValueError):
    """A name cannot become a target (a path or key); the message says why."""


def tenant_problem(tenant: str) -> str | None:
    """Why `tenant` is not an acceptable tenant id, or None if it is."""
    if not tenant:
        return "is empty"
    if len(tenant) > MAX_TENANT_LENGTH:
        return f"is longer than {MAX_TENANT_LENGTH} characters"
    for index, char in enumerate(tenant):
        if "\ud800" <= char <= "\udfff":
            return f"is not valid Unicode (lone surrogate at character {index + 1})"
        if unicodedata.category(char) == "Cc":
            return f"contains the control character {char!r} at character {index + 1}"
    if tenant != tenant.strip():
        return "has leading or trailing whitespace"
    return None


def check_tenant(tenant: str) -> str:
    """`tenant` if acceptable, else `TargetError` naming the problem."""
    problem = tenant_problem(tenant)
    if problem is not None:
        raise TargetError(f"tenant {shown(tenant)} {problem}")
    return tenant


def path_segment(tenant: str) -> str:
    """The file-name-safe, one-to-one form of `tenant` (see module docstring)."""
    # quote() never encodes "~" (RFC 3986 unreserved); a shell would expand it.
    segment = quote(tenant, safe=_SAFE_SEGMENT).replace("~", "%7E")
    if segment.startswith("."):
        segment = "%2E" + segment[1:]
    return segment


def template_directory(template: str) -> str:
    """The directory a path template names: everything before its first placeholder."""
    head = template.split("{", 1)[0]
    return os.path.dirname(head) if "{" in template else os.path.dirname(template)


def expand_path(template: str, *, job: str, tenant: str | None) -> str:
    """Fill ``{job}``/``{tenant}`` in a file path, keeping it inside its directory."""
    path = template.replace("{job}", job)
    if tenant is not None:
        path = path.replace("{tenant}", path_segment(check_tenant(tenant)))
    directory = os.path.abspath(template_directory(template) or ".")
    resolved = os.path.abspath(path)
    if os.path.commonpath([directory, resolved]) != directory or resolved == directory:
        raise TargetError(f"path {path!r} leaves the sink directory {directory!r}")
    name = os.path.basename(resolved)
    if len(name.encode()) > MAX_FILE_NAME_BYTES:
        raise TargetError(
            f"file name for {shown(tenant or job)} is longer than {MAX_FILE_NAME_BYTES} bytes"
        )
    return path


def secret_key_problem(key: str) -> str | None:
    """Why `key` is not a usable Secret data key for a token, or None."""
    if not key:
        return "is empty"
    if len(key) > MAX_SECRET_KEY_LENGTH:
        return f"is longer than {MAX_SECRET_KEY_LENGTH} characters"
    if not _SECRET_KEY.match(key):
        return "may only contain letters, digits, '-', '_' and '.'"
    if key in (".", "..") or key.startswith(".."):
        return "must not be '.' or '..' or start with '..'"
    return None


def expand_key(template: str, *, job: str, tenant: str | None) -> str:
    """Fill ``{job}``/``{tenant}`` in a Secret key; refuse what is not a valid key."""
    key = template.replace("{job}", job)
    if tenant is not None:
        key = key.replace("{tenant}", check_tenant(tenant))
    problem = secret_key_problem(key)
    if problem is not None:
        who = f" (tenant {shown(tenant)})" if tenant is not None and "{tenant}" in template else ""
        raise TargetError(f"Secret key {shown(key)}{who} {problem}")
    return key


def name_segment(text: str) -> str:
    """`text` as part of a variable name (see module docstring)."""
    # Only ASCII is upper-cased: str.upper() turns some letters into two ("ß" -> "SS").
    return _NAME_OUTSIDE.sub("_", "".join(c.upper() if c.isascii() else "_" for c in text))


def expand_name(template: str | None, *, job: str, tenant: str | None) -> str:
    """A bundle member's variable name (see module docstring); `TargetError` if the
    result is not a variable name."""
    if template is None:
        template = "{job}" if tenant is None else "{job}_{tenant}"
    name = template.replace("{job}", name_segment(job))
    if tenant is not None:
        name = name.replace("{tenant}", name_segment(check_tenant(tenant)))
    if name[:1].isdigit():
        name = "_" + name
    if not ENV_NAME.match(name):
        raise TargetError(f"variable name {shown(name)} is not [A-Za-z_][A-Za-z0-9_]*")
    return name


def secret_data_keys(key: str) -> tuple[str, ...]:
    """Every data key a Secret sink with key `key` may write or remove."""
    return tuple(key + suffix for suffix in SECRET_KEY_SUFFIXES)


Owner = tuple[str, str | None]


@dataclass(frozen=True)
class SharedTarget:
    """A file or Secret key that many owners write together: one bundle. Owners
    claiming it with another `identity` (other bundle settings) collide."""

    target: str
    identity: str


Target = str | SharedTarget


@dataclass
class TargetClaims:
    """Who writes where: one owner per file path and per Secret data key, or the
    members of one bundle.

    `claim` records every target of one (job, tenant) or refuses all of them when
    any is already another owner's, so a refused tenant changes nothing.
    """

    #: target -> (bundle identity, or None for a single writer; its owners)
    _owners: dict[str, tuple[str | None, set[Owner]]] = field(default_factory=dict)
    _targets: dict[Owner, list[str]] = field(default_factory=dict)

    def claim(self, owner: Owner, targets: list[Target]) -> None:
        for target in targets:
            where, identity = _split(target)
            held_identity, owners = self._owners.get(where, (None, set()))
            others = sorted(owners - {owner}, key=describe_owner)
            if others and (identity is None or identity != held_identity):
                differ = " as different bundles" if identity and held_identity else ""
                raise TargetError(
                    f"{describe_owner(owner)} and {describe_owner(others[0])} would both "
                    f"write {where}{differ}"
                )
        self.release(owner)
        for target in targets:
            where, identity = _split(target)
            self._owners.setdefault(where, (identity, set()))[1].add(owner)
        self._targets[owner] = [_split(t)[0] for t in targets]

    def release(self, owner: Owner) -> None:
        for target in self._targets.pop(owner, []):
            held = self._owners.get(target)
            if held is not None:
                held[1].discard(owner)
                if not held[1]:
                    del self._owners[target]

    def release_job(self, job: str) -> None:
        for owner in [o for o in self._targets if o[0] == job]:
            self.release(owner)


def _split(target: Target) -> tuple[str, str | None]:
    if isinstance(target, SharedTarget):
        return target.target, target.identity
    return target, None


def describe_owner(owner: Owner) -> str:
    job, tenant = owner
    return f"job {job!r}" + (f" tenant {shown(tenant)}" if tenant is not None else "")


def shown(text: str | None) -> str:
    """`text` quoted for a message, cut short and with anything odd escaped."""
    if text is None:
        return "''"
    shown = text if len(text) <= 60 else text[:57] + "..."
    return ascii(shown) if not shown.isprintable() else repr(shown)
