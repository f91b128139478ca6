"""Template sinks (``kind: template``): the placeholder language, errors that name
their line, the shipped examples read by their real consumers (curl with a .netrc,
lightkube with a kubeconfig, Docker's config.json scheme, an nginx include), the
template file watched and re-rendered (a broken change keeps the last good output),
and the output read back at restart."""

from __future__ import annotations

import base64
import json
import netrc
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from lightkube import KubeConfig

from refresher.clock import SystemClock
from refresher.config import load_settings
from refresher.errors import ConfigError, TemplateError
from refresher.templating import parse_template, token_values
from refresher.token import Token, rfc3339
from tests.conftest import deb_job, metric, oauth2_job, wait_for

pytestmark = pytest.mark.anyio
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "templates"


def token(value: str = "tok-123", **extra: Any) -> Token:
    return Token(
        value=value, token_type="Bearer", obtained_at=1000.0, expires_at=5000.0, extra=extra
    )


def render(text: str, tok: Token | None = None, **known: Any) -> str:
    values = token_values(
        tok or token(), job="api", tenant=known.get("tenant"), username=known.get("username")
    )
    return parse_template(text).render(values)


# ---------------------------------------------------------------------------- the language


def test_placeholders_and_everything_else_is_text() -> None:
    tok = token(creditorId="c-1")
    text = (
        "proxy_set_header Host $host; ${token_type} ${value} $${literal} ${metadata.creditorId}\n"
    )
    assert render(text, tok) == "proxy_set_header Host $host; Bearer tok-123 ${literal} c-1\n"
    assert render('{"auth": "${basic_b64}", "t": ${value_json}}', username="user") == (
        f'{{"auth": "{base64.b64encode(b"user:tok-123").decode()}", "t": "tok-123"}}'
    )
    assert render("${value_b64} ${fingerprint} ${expires_at} ${job}") == (
        f"{base64.b64encode(b'tok-123').decode()} {tok.fingerprint()} {rfc3339(5000.0)} api"
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("a\nb ${value}\nc ${valeu}\n", "line 3, column 3: unknown field ${valeu}"),
        ("x\n  ${value\n}", "line 2, column 3: '${' is not closed by '}'"),
        ("${ value }", "line 1, column 1: unknown field ${ value }"),
        ("${env.HOME} ${value}", "unknown field ${env.HOME}"),
        ("${expires_at} only", "never inserts the token"),
        ("${value}\x00", "line 1, column 9: contains a NUL character"),
    ],
)
def test_a_template_error_names_its_line_and_column(text: str, error: str) -> None:
    with pytest.raises(TemplateError, match=error.replace("$", r"\$").replace("{", r"\{")):
        parse_template(text)


@pytest.mark.parametrize("tenant", ['a"b', "a b", "a\\b", "a;b", "~a", "a$b", "a#b", "a'b"])
def test_outside_text_that_could_break_a_format_is_not_inserted(tenant: str) -> None:
    with pytest.raises(TemplateError, match=r"\$\{tenant\} holds characters"):
        render("${tenant} ${value}", tenant=tenant)
    with pytest.raises(TemplateError, match=r"\$\{metadata.x\} holds characters"):
        render("${metadata.x} ${value}", token(x=tenant))
    with pytest.raises(TemplateError, match="no such metadata"):
        render("${metadata.absent} ${value}")


@pytest.mark.parametrize("field", ["value", "value_b64", "value_json", "basic_b64"])
def test_an_output_reads_back_through_its_template(field: str) -> None:
    template = parse_template(f"# expires ${{expires_at}} since ${{obtained_at}}\nX ${{{field}}}\n")
    tok = token("tok.A-b_c~9")
    text = template.render(token_values(tok, job="api", tenant=None, username="u"))
    back = template.read_token(text, {"job": "api", "tenant": "", "username": "u"})
    assert back is not None and (back.value, back.expires_at, back.obtained_at) == (
        "tok.A-b_c~9",
        5000.0,
        1000.0,
    )
    assert template.read_token(text.replace("X", "Y"), {"job": "api"}) is None
    if field == "basic_b64":
        assert template.read_token(text, {"job": "api", "username": "other"}) is None


def test_a_template_error_at_load_is_a_config_error_naming_the_line(tmp_path: Path) -> None:
    template = tmp_path / "t.tmpl"
    template.write_text("one\ntwo ${value}\nthree ${nope}\n")
    job = {
        "name": "api",
        "provider": {
            "kind": "oauth2",
            "token_url": "https://a.example/t",
            "client_id": "c",
            "client_secret": "s",
        },
        "sinks": [{"kind": "template", "template": str(template), "path": str(tmp_path / "o")}],
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(data={"jobs": [job]})
    assert caught.value.errors == [
        f"jobs[0].sinks[0]: template {template}: line 3, column 7: unknown field ${{nope}} "
        "(fields: value, token_type, expires_at, obtained_at, fingerprint, job, tenant, "
        "username, value_b64, basic_b64, value_json, metadata.KEY)"
    ]
    template.write_text("${basic_b64}\n")
    with pytest.raises(ConfigError, match=r"uses \$\{basic_b64\}: set username"):
        load_settings(data={"jobs": [job]})
    template.unlink()
    with pytest.raises(ConfigError, match="template: file not found"):
        load_settings(data={"jobs": [job]})
    load_settings(data={"jobs": [job]}, check_files=False)  # `check --no-files`


# ---------------------------------------------------------------------------- shipped examples


@pytest.fixture
def basic_auth_server() -> Iterator[tuple[int, list[str]]]:
    """A loopback HTTP server recording each request's Authorization header."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_the_shipped_examples_are_read_by_their_consumers(
    start_daemon, oauth2_emulator, tmp_path, basic_auth_server, leak_guard
) -> None:
    api = oauth2_job(oauth2_emulator, tmp_path)
    outputs = {
        "nginx-auth.conf": {},
        "netrc": {"username": "refresher"},
        "docker-config.json": {"username": "oauth2accesstoken"},
        "kubeconfig": {},
    }
    api["sinks"] = [
        {
            "kind": "template",
            "template": str(EXAMPLES / f"{name}.tmpl"),
            "path": str(tmp_path / name),
            **extra,
        }
        for name, extra in outputs.items()
    ]
    async with start_daemon({"jobs": [api]}) as daemon:
        runtime = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: runtime.token is not None and not runtime.refreshing)
        value = runtime.token.value
    # nginx: the include's one directive sends the token upstream.
    directives = [
        line
        for line in (tmp_path / "nginx-auth.conf").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert directives == [f'proxy_set_header Authorization "Bearer {value}";']
    # .netrc: Python's parser and curl's both find the credentials for the host.
    login, _, password = netrc.netrc(str(tmp_path / "netrc")).authenticators("api.partner.example")
    assert (login, password) == ("refresher", value)
    port, seen = basic_auth_server
    await anyio.run_process(
        [
            "curl",
            "-sS",
            "--netrc-file",
            str(tmp_path / "netrc"),
            "--resolve",
            f"api.partner.example:{port}:127.0.0.1",
            f"http://api.partner.example:{port}/",
        ],
        check=True,
    )
    assert seen == ["Basic " + base64.b64encode(f"refresher:{value}".encode()).decode()]
    leak_guard.extra_outputs.extend(seen)
    # Docker: auths.<registry>.auth is base64 of "user:token".
    auth = json.loads((tmp_path / "docker-config.json").read_text())["auths"]
    assert base64.b64decode(auth["registry.partner.example"]["auth"]).decode() == (
        f"oauth2accesstoken:{value}"
    )
    # kubeconfig: lightkube's loader sees the token as the current context's user.
    config = KubeConfig.from_file(tmp_path / "kubeconfig").get()
    assert config.user.token == value and config.cluster.server.startswith("https://")


# ---------------------------------------------------------------------------- watch and restart


async def test_a_changed_template_is_re_rendered_and_a_broken_one_keeps_the_output(
    start_daemon, oauth2_emulator, tmp_path, leak_guard
) -> None:
    template, output, notified = tmp_path / "t.tmpl", tmp_path / "out.conf", tmp_path / "notified"
    template.write_text("A ${value}\n")
    api = oauth2_job(oauth2_emulator, tmp_path)
    api["sinks"] = [{"kind": "template", "template": str(template), "path": str(output)}]
    api["notify"] = [
        {
            "kind": "command",
            "argv": ["sh", "-c", 'echo "$REFRESHER_SINK_PATH" >> "$0"', str(notified)],
        }
    ]
    async with start_daemon({"jobs": [api]}, clock=SystemClock()) as daemon:
        runtime = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: output.exists() and notified.exists())
        await wait_for(lambda: daemon.watcher.ready.is_set())
        value = runtime.token.value
        assert output.read_text() == f"A {value}\n"
        template.write_text("B ${value_b64}\n")
        await wait_for(lambda: output.read_text().startswith("B "), timeout=10)
        assert output.read_text() == f"B {base64.b64encode(value.encode()).decode()}\n"
        await wait_for(lambda: len(notified.read_text().splitlines()) == 2)
        template.write_text("C ${value\n")
        await wait_for(
            lambda: leak_guard.events("template change refused: keeping the last good output"),
            timeout=10,
        )
        assert output.read_text().startswith("B ") and runtime.token.value == value
        assert metric(daemon, "refresher_template_errors_total", template=str(template)) == 1
        [refused] = leak_guard.events("template change refused: keeping the last good output")
        assert "line 1, column 3: '${' is not closed" in refused["error"]
        # A template that parses but cannot render this token keeps the output too.
        template.write_text("D ${metadata.nope} ${value}\n")
        failed = "template re-render failed: keeping the last good output"
        await wait_for(lambda: leak_guard.events(failed), timeout=10)
        [failure] = leak_guard.events(failed)
        assert "no such metadata" in failure["error"] and failure["target"] == str(output)
        assert output.read_text().startswith("B ") and runtime.token.value == value
        assert metric(daemon, "refresher_template_errors_total", template=str(template)) == 2
    assert notified.read_text().splitlines() == [str(output), str(output)]


async def test_a_restart_reads_the_output_back_through_the_template(
    start_daemon, debitura, tmp_path
) -> None:
    template = tmp_path / "t.tmpl"
    template.write_text("# ${tenant} until ${expires_at}\ntoken=${value}\n")
    job = deb_job(debitura, tmp_path, ["t-1", "t-2"])
    job["sinks"] = [
        {"kind": "template", "template": str(template), "path": str(tmp_path / "{tenant}.conf")}
    ]
    async with start_daemon({"jobs": [job]}) as daemon:
        await wait_for(
            lambda: all(r.token and not r.refreshing for r in daemon.scheduler.jobs.values())
        )
    mints = debitura.count()
    async with start_daemon({"jobs": [job]}) as daemon:
        assert all(r.token is not None for r in daemon.scheduler.jobs.values())
    assert debitura.count() == mints
    # Edited by hand, the output no longer matches the template: the job mints again.
    (tmp_path / "t-1.conf").write_text("token=edited\n")
    async with start_daemon({"jobs": [job]}) as daemon:
        await wait_for(lambda: debitura.count() == mints + 1)
        await wait_for(lambda: (tmp_path / "t-1.conf").read_text() != "token=edited\n")


async def test_a_token_whose_render_fails_is_a_sink_failure(
    start_daemon, oauth2_emulator, tmp_path
) -> None:
    template = tmp_path / "t.tmpl"
    template.write_text("${metadata.tenant_id} ${value}\n")
    api = oauth2_job(oauth2_emulator, tmp_path)
    api["sinks"] = [{"kind": "template", "template": str(template), "path": str(tmp_path / "o")}]
    async with start_daemon({"jobs": [api]}) as daemon:
        runtime = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: runtime.failures > 0)
        assert runtime.failure_reason == "sink" and "no such metadata" in runtime.failure_message
        assert not (tmp_path / "o").exists()
