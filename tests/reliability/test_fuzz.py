"""Input side of the fault matrix: property-based fuzzing (hypothesis).

* Provider answers: whatever status, headers and body a provider sends, parsing
  either yields a usable token (non-empty value, expiry after the moment it was
  obtained) or a `ProviderError` — never another exception (which would be a crash
  path) and never a token that expired already.
* Config documents: whatever YAML-shaped document is loaded, the result is either
  valid settings or a `ConfigError` whose every line is ``path: message``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refresher.clock import ManualClock
from refresher.config import load_settings
from refresher.errors import ConfigError, ProviderError
from refresher.providers.base import HTTPClients, HTTPProvider, Response, raise_for_status
from refresher.providers.oauth2 import OAuth2ProviderConfig

NOW = 1_800_000_000.0

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)

token_like = st.one_of(st.text(max_size=60), st.just("eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2ln"), json_values)
expires_like = st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=8), st.none(), st.booleans(), json_values)

grant_bodies = st.fixed_dictionaries(
    {},
    optional={
        "access_token": token_like, "accessToken": token_like,
        "expires_in": expires_like, "expiresIn": expires_like,
        "token_type": json_values, "tokenType": json_values, "scope": json_values,
    },
)
bodies = st.one_of(
    grant_bodies.map(lambda d: json.dumps(d, allow_nan=True).encode()),
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.binary(max_size=200),
)


@pytest.fixture(scope="module")
def provider() -> HTTPProvider:
    config = OAuth2ProviderConfig(kind="oauth2", token_url="http://127.0.0.1:1/t", client_id="c", client_secret="s")
    return HTTPProvider(config, base_url="http://127.0.0.1:1", clients=HTTPClients(), clock=ManualClock(NOW), secrets={})


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    status=st.sampled_from([200, 201, 204, 400, 401, 403, 404, 429, 500, 502, 503]),
    body=bodies,
    retry_after=st.one_of(st.none(), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
                          st.integers(-5, 10**9).map(str)),
    camel=st.booleans(),
)
def test_any_provider_answer_is_a_token_or_a_provider_error(provider, status, body, retry_after, camel) -> None:
    headers = httpx2.Headers({"content-type": "application/json", **({"retry-after": retry_after} if retry_after is not None else {})})
    response = Response(status, headers, body, NOW)
    names = (
        {"value": "accessToken", "token_type": "tokenType", "expires_in": "expiresIn"} if camel else {}
    )
    try:
        raise_for_status(response, "token request")
        token = provider.token_from(response.json_object(), obtained_at=NOW, **names)
    except ProviderError as error:
        assert error.reason in {"transport", "timeout", "server_error", "rate_limited",
                                "unauthorized", "forbidden", "bad_response"}
        retry = getattr(error, "retry_after", None)
        assert retry is None or retry >= 0
        return
    assert isinstance(token.value, str) and token.value
    assert token.expires_at is not None and token.expires_at > NOW


LOCATION = re.compile(r"^\S.*?: .+", re.DOTALL)


def valid_document(tmp_path_str: str) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:9464"},
        "jobs": [{
            "name": "api",
            "provider": {"kind": "gooclaim", "client_id": "c", "client_secret": "s"},
            "sinks": [{"kind": "file", "path": f"{tmp_path_str}/api.token"}],
        }],
    }


paths = st.sampled_from([
    ("server",), ("server", "listen"), ("refresh",), ("refresh", "jitter"), ("refresh", "backoff"),
    ("jobs",), ("jobs", 0), ("jobs", 0, "name"), ("jobs", 0, "provider"), ("jobs", 0, "provider", "kind"),
    ("jobs", 0, "provider", "client_id"), ("jobs", 0, "sinks"), ("jobs", 0, "sinks", 0),
    ("jobs", 0, "sinks", 0, "mode"), ("jobs", 0, "sinks", 0, "kind"), ("jobs", 0, "notify"), ("metrics",),
])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(path=paths, value=json_values)
def test_any_config_document_is_valid_or_names_every_bad_field(path, value) -> None:
    document: Any = valid_document("/tmp")
    target = document
    for key in path[:-1]:
        target = target.setdefault(key, {}) if isinstance(target, dict) else target[key]
    if isinstance(target, dict) or (isinstance(target, list) and isinstance(path[-1], int) and path[-1] < len(target)):
        target[path[-1]] = value
    try:
        load_settings(data=document)
    except ConfigError as error:
        assert error.errors, "a ConfigError must say what is wrong"
        for line in error.errors:
            assert LOCATION.match(line), line
        return
