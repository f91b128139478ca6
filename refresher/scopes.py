"""Requested (or expected) scopes against what a grant says it granted: one rule for
every provider.

RFC 6749 §3.3 lets a server grant less than was asked for and §5.1 lets it leave
``scope`` out of the answer when it granted exactly what was requested. A shortfall
is a warning (log, ``scope_missing`` in ``/v1/tokens``, ``refresher_scope_missing``)
or, with ``require_scopes: true``, a failure that writes nothing (DutyClaims: "keep
partner capability state aligned with the scopes you request").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from refresher.errors import ScopeMissingError
from refresher.token import Token


def missing_scopes(
    wanted: Sequence[str], granted: str | None, *, absent_means_granted: bool
) -> tuple[str, ...]:
    """The scopes of `wanted` that `granted` (space-separated) lacks, in `wanted`'s order.

    `absent_means_granted`: the scopes were *requested*, so an answer without ``scope``
    granted them (RFC 6749 §5.1). For scopes only *expected* (nothing was requested)
    an absent ``scope`` grants none of them.
    """
    if not wanted:
        return ()
    if granted is None:
        return () if absent_means_granted else tuple(wanted)
    have = set(granted.split())
    return tuple(scope for scope in wanted if scope not in have)


def check_scopes(
    token: Token, wanted: Sequence[str], *, require: bool, requested: bool, what: str
) -> Token:
    """`token` with its `missing_scopes` filled in, or `ScopeMissingError` when scopes
    are missing and `require` says a shortfall is a failure."""
    missing = missing_scopes(wanted, token.scope, absent_means_granted=requested)
    if not missing:
        return token
    if require:
        verb = "requested" if requested else "expected"
        raise ScopeMissingError(
            f"{what}: the grant lacks {verb} scope(s) {' '.join(missing)} "
            "(require_scopes: nothing written)",
            missing=missing,
        )
    return dataclasses.replace(token, missing_scopes=missing)
