"""Properties over all inputs (hypothesis):

* for any tenant string, the sink path stays inside its directory, or the tenant
  is refused; distinct tenants never share a file;
* for any provider body, parsing gives a token that is safe to write in every
  file format, or a `ProviderError` — never another exception.
"""

from __future__ import annotations

import json
import os
import re
import string

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refresher.clock import ManualClock
from refresher.config import FileSinkConfig
from refresher.errors import ProviderError
from refresher.providers.base import HTTPClients, HTTPProvider, Response, raise_for_status
from refresher.providers.oauth2 import OAuth2ProviderConfig
from refresher.sinks.file import parse, render
from refresher.targets import TargetError, expand_key, expand_path, path_segment, tenant_problem

NOW = 1_800_000_000.0
DIRECTORY = "/srv/tokens/sinks"

hostile_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("./\\%~$`'\"\n\r\t\x00 ;&|*?{}[]#:@=+-_")),
        st.characters(),  # any code point, surrogates and controls included
    ),
    max_size=80,
)


@settings(max_examples=600, deadline=None, derandomize=True)
@given(tenant=hostile_text, template=st.sampled_from(["{tenant}", "{tenant}.json", "x-{tenant}", "{job}/{tenant}.jwt"]))
def test_any_tenant_stays_inside_its_directory_or_is_refused(tenant: str, template: str) -> None:
    try:
        path = expand_path(f"{DIRECTORY}/{template}", job="job", tenant=tenant)
    except TargetError:
        assert tenant_problem(tenant) is not None or len(path_segment(tenant).encode()) > 240
        return
    assert tenant_problem(tenant) is None
    resolved = os.path.abspath(path)
    assert os.path.commonpath([DIRECTORY, resolved]) == DIRECTORY and resolved != DIRECTORY
    name = os.path.basename(resolved)
    assert not name.startswith(".") and "/" not in path_segment(tenant)
    assert set(path_segment(tenant)) <= set(string.ascii_letters + string.digits + "-_.%")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(a=hostile_text, b=hostile_text)
def test_distinct_tenants_never_share_a_file(a: str, b: str) -> None:
    if a != b:
        assert path_segment(a) != path_segment(b)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(tenant=hostile_text)
def test_any_tenant_is_a_valid_secret_key_or_refused(tenant: str) -> None:
    try:
        key = expand_key("{tenant}", job="job", tenant=tenant)
    except TargetError:
        return
    assert re.fullmatch(r"[-._a-zA-Z0-9]{1,242}", key) and not key.startswith("..") and key != "."


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    hostile_text,
    st.sampled_from(["3600", " 60 ", "1e12", "-1", "0x10", "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2ln"]),
)
grant = st.fixed_dictionaries(
    {},
    optional={
        "access_token": json_scalars,
        "expires_in": json_scalars,
        "token_type": json_scalars,
        "scope": json_scalars,
        "extra": st.dictionaries(st.text(max_size=5), json_scalars, max_size=3),
    },
)


@pytest.fixture(scope="module")
def provider() -> HTTPProvider:
    config = OAuth2ProviderConfig(
        kind="oauth2", token_url="http://127.0.0.1:1/t", client_id="c", client_secret="secret"
    )
    return HTTPProvider(
        config, base_url="http://127.0.0.1:1", clients=HTTPClients(), clock=ManualClock(NOW), secrets={}
    )


SINKS = {fmt: FileSinkConfig(kind="file", path="/x/t", format=fmt) for fmt in ("raw", "json", "env", "header")}
SHELL_INERT = re.compile(r"[A-Za-z0-9\-._~+/=%@]+")


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=grant)
def test_any_provider_body_is_a_safe_token_or_a_provider_error(provider: HTTPProvider, body: dict) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    response = Response(200, httpx2.Headers({"content-type": "application/json"}), raw, NOW)
    try:
        raise_for_status(response, "token request")
        token = provider.token_from(response.json_object(), obtained_at=NOW)
    except ProviderError:
        return
    assert NOW < token.expires_at <= NOW + 365 * 86400
    assert SHELL_INERT.fullmatch(token.value) and not token.value.startswith("~")
    assert SHELL_INERT.fullmatch(token.token_type)
    for fmt, config in SINKS.items():
        content = render(token, config)
        text = content.decode("ascii") if fmt != "json" else content.decode()
        lines = text.splitlines()
        if fmt == "raw":
            assert text == token.value + "\n"
        elif fmt == "header":
            assert text == f"Authorization: {token.token_type} {token.value}\n"
        else:
            # Formats that carry the expiry read back to the same token after a restart.
            if fmt == "env":
                names = [line.split("=", 1)[0] for line in lines]
                assert names == ["TOKEN", "TOKEN_TYPE", "TOKEN_EXPIRES_AT"]
            recovered = parse(content, config)
            assert recovered is not None and recovered.value == token.value
