"""What must survive a restart that no sink holds: the refresh token an authorization
server rotated (RFC 6749 §6, RFC 9700 §4.14.2). The server forgets the old one the
moment it issues the new one, so losing the new one locks the client out until a
person consents again.

One JSON file per job in ``state_dir``, ``<job>.refresh-token.json``, mode 0600,
written atomically (temp file in the same directory, fsync, rename, fsync the
directory) *before* the access token minted with it is published. It records the
SHA-256 of the ``refresh_token_file`` content it descends from: an operator who puts
a new refresh token there starts a new line, and the state of the old one is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from refresher.errors import SecretUnusableError
from refresher.fields import secret_problem
from refresher.token import rfc3339

#: The state file is a few hundred bytes; refuse to read more than this.
MAX_STATE_BYTES = 1 << 16


def seed_digest(seed: str) -> str:
    """The SHA-256 (hex) of a refresh token as the operator supplied it."""
    return hashlib.sha256(seed.encode()).hexdigest()


@dataclass(frozen=True)
class StoredRefreshToken:
    value: str
    #: `seed_digest` of the ``refresh_token_file`` content this one descends from.
    seed: str


class RefreshTokenState:
    """The newest refresh token of one job, in ``state_dir``."""

    def __init__(self, directory: Path, job: str) -> None:
        self.directory = directory
        self.path = directory / f"{job}.refresh-token.json"

    def load(self) -> StoredRefreshToken | None:
        """The stored token; None when there is none yet. A file that cannot be read
        or trusted is the job's problem (`SecretUnusableError`): falling back to the
        original refresh token would replay a used one, which servers punish by
        revoking every token of the grant."""
        where = f"state_dir: {self.path}"
        try:
            with self.path.open("rb") as file:
                data = file.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SecretUnusableError(f"{where}: cannot read ({exc.strerror or exc})") from None
        try:
            document = json.loads(data)
            value, seed = document["refresh_token"], document["seed_sha256"]
        except (ValueError, TypeError, KeyError):
            document, value, seed = None, None, None
        if (
            len(data) > MAX_STATE_BYTES
            or not isinstance(value, str)
            or secret_problem(value) is not None
            or not isinstance(seed, str)
        ):
            raise SecretUnusableError(
                f"{where}: not a refresh-token state file (remove it and put a valid refresh "
                "token in refresh_token_file)"
            )
        return StoredRefreshToken(value=value, seed=seed)

    def save(self, value: str, *, seed: str, now: float) -> None:
        """Store `value` atomically and durably; `SecretUnusableError` if it cannot be."""
        document = {"refresh_token": value, "seed_sha256": seed, "saved_at": rfc3339(now)}
        content = json.dumps(document, indent=2).encode() + b"\n"
        temp: str | None = None
        try:
            descriptor, temp = tempfile.mkstemp(dir=self.directory, prefix=f".{self.path.name}.")
            with os.fdopen(descriptor, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.path)
            temp = None
            _sync_directory(self.directory)
        except OSError as exc:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> SecretUnusableError:
        return SecretUnusableError(
            f"state_dir: cannot save the rotated refresh token in {self.path} "
            f"({exc.strerror or exc}): nothing is published until it is saved"
        )


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` survive a power loss."""
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
