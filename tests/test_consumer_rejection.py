"""Consumers report rejected tokens: ``POST /v1/tokens/{job}/refresh
?tenant=T&rejected=FP``, the partner's retry-once-on-401 rule done once for every
consumer, and the shipped consumer example run end to end against the Debitura
emulator's Customer API."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from refresher.clock import SystemClock
from tests.conftest import DEB_KEY, deb_job, get_json, metric, wait_for

pytestmark = pytest.mark.anyio
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("debitura_consumer", EXAMPLES / "debitura_consumer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["debitura_consumer"] = module
    spec.loader.exec_module(module)
    return module


async def report(daemon, tenant: str, fingerprint: str, token: str | None = None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{daemon.port}", headers=headers) as client:
        return await client.post(
            "/v1/tokens/debitura/refresh", params={"tenant": tenant, "rejected": fingerprint}
        )


def fp(runtime: Any) -> str:
    return runtime.token.fingerprint()


async def test_a_replaced_token_answers_at_once_without_a_mint(start_daemon, debitura, tmp_path) -> None:
    async with start_daemon({"jobs": [deb_job(debitura, tmp_path, ["t-1"])]}) as daemon:
        rt = daemon.scheduler.jobs[("debitura", "t-1")]
        await wait_for(lambda: rt.token and rt.refreshing is None)
        mints = debitura.count()
        answer = await report(daemon, "t-1", "0123456789ab")
        assert answer.status_code == 200
        assert answer.json() == {
            "fingerprint": fp(rt),
            "expires_at": answer.json()["expires_at"],
            "minted": False,
        }
        assert debitura.count() == mints


async def test_reports_of_the_current_token_share_one_mint(start_daemon, debitura, clock, tmp_path) -> None:
    async with start_daemon({"jobs": [deb_job(debitura, tmp_path, ["t-1"])]}) as daemon:
        rt = daemon.scheduler.jobs[("debitura", "t-1")]
        await wait_for(lambda: rt.token and rt.refreshing is None)
        # An operator forced a refresh a second ago: the per-job interval must not
        # refuse the first rejection of the token that refresh produced.
        await daemon.scheduler.feedback.force("debitura", "t-1")
        await clock.advance(1)
        rejected, mints = fp(rt), debitura.count()
        answers: list[httpx2.Response] = []

        async def one() -> None:
            answers.append(await report(daemon, "t-1", rejected))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
        assert {a.status_code for a in answers} == {200}
        assert {a.json()["fingerprint"] for a in answers} == {fp(rt)} and fp(rt) != rejected
        assert any(a.json()["minted"] for a in answers)
        assert debitura.count() == mints + 1, "ten reports of one token: one mint"
        doc = json.loads((tmp_path / "t-1.json").read_text())
        assert doc["fingerprint"] == fp(rt), "the file is current when the answer comes"


async def test_a_rejected_answer_to_a_rejection_marks_only_that_link_invalid(
    start_daemon, debitura, clock, tmp_path, leak_guard
) -> None:
    admin = tmp_path / "admin"
    admin.write_text("admin-secret-value\n")
    leak_guard.secrets.add("admin-secret-value")
    config = {
        "server": {"listen": "127.0.0.1:0", "admin_token_file": str(admin)},
        "jobs": [deb_job(debitura, tmp_path, ["t-good", "t-bad"])],
    }
    async with start_daemon(config) as daemon:
        jobs = daemon.scheduler.jobs
        bad, good = jobs[("debitura", "t-bad")], jobs[("debitura", "t-good")]
        await wait_for(lambda: bad.token and good.token and bad.refreshing is None)
        first = await report(daemon, "t-bad", fp(bad), "admin-secret-value")
        assert first.status_code == 200 and first.json()["minted"] is True
        second = await report(daemon, "t-bad", fp(bad), "admin-secret-value")
        assert second.status_code == 409 and second.json()["state"] == "invalid_link"
        assert bad.display_state(clock.now()) == "invalid_link" and not bad.valid(clock.now())
        assert metric(daemon, "refresher_refresh_failures_total", token_job="debitura", reason="invalid_link") == 1
        assert len(leak_guard.events(next(e["event"] for e in leak_guard.lines() if e["event"].startswith("link invalid")))) == 1
        _, body = await get_json(daemon, "/v1/tokens", leak_guard)
        states = {j["tenant"]: j["state"] for j in body["jobs"]}
        assert states == {"t-good": "valid", "t-bad": "invalid_link"}
        # No more mints for t-bad over two whole lifetimes; t-good goes on.
        mints = debitura.count(client="t-bad")
        good_before = good.token
        await clock.advance(3600)
        await wait_for(lambda: good.token is not good_before and good.refreshing is None)
        assert debitura.count(client="t-bad") == mints
        # Further reports keep answering 409 without a mint.
        assert (await report(daemon, "t-bad", fp(bad), "admin-secret-value")).status_code == 409
        # An operator's plain forced refresh clears the verdict.
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{daemon.port}") as client:
            forced = await client.post(
                "/v1/tokens/debitura/refresh",
                params={"tenant": "t-bad"},
                headers={"Authorization": "Bearer admin-secret-value"},
            )
        assert forced.status_code == 200 and bad.state != "invalid_link"
        assert debitura.count(client="t-bad") == mints + 1


async def test_who_may_report_and_who_may_force(start_daemon, debitura, tmp_path, leak_guard) -> None:
    admin, consumer = tmp_path / "admin", tmp_path / "consumer"
    admin.write_text("the-admin-secret")
    consumer.write_text("the-consumer-secret")
    leak_guard.secrets.update({"the-admin-secret", "the-consumer-secret"})
    config = {
        "server": {
            "listen": "0.0.0.0:0",
            "admin_token_file": str(admin),
            "consumer_token_file": str(consumer),
        },
        "jobs": [deb_job(debitura, tmp_path, ["t-1"])],
    }
    async with start_daemon(config) as daemon:
        rt = daemon.scheduler.jobs[("debitura", "t-1")]
        await wait_for(lambda: rt.token and rt.refreshing is None)
        base = f"http://127.0.0.1:{daemon.port}"
        async with httpx2.AsyncClient(base_url=base) as client:

            async def post(token: str | None, **params: str) -> int:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                answer = await client.post("/v1/tokens/debitura/refresh", params={"tenant": "t-1", **params}, headers=headers)
                return answer.status_code

            assert await post(None, rejected="0123456789ab") == 401
            assert await post("nope", rejected="0123456789ab") == 401
            assert await post("the-consumer-secret", rejected="0123456789ab") == 200
            assert await post("the-consumer-secret") == 401, "a consumer cannot force a plain refresh"
            assert await post("the-admin-secret", rejected="0123456789ab") == 200
            assert await post("the-admin-secret") == 200
            assert await post("the-admin-secret", rejected="NOT-A-PRINT") == 400
            assert await post("the-admin-secret", rejected="0123456789ab", tenant="t-404") == 404


async def test_the_consumer_example_end_to_end(start_daemon, debitura, tmp_path, leak_guard) -> None:
    example = load_example()
    debitura.unlinked.add("t-unlinked")
    job = deb_job(debitura, tmp_path, ["t-1", "t-2", "t-unlinked"])
    async with start_daemon({"jobs": [job]}, clock=SystemClock()) as daemon:
        jobs = daemon.scheduler.jobs
        await wait_for(lambda: all(r.token and r.refreshing is None for r in jobs.values()))
        api = example.CustomerApi(
            tokens_dir=tmp_path, customer_api=debitura.url, daemon=f"http://127.0.0.1:{daemon.port}"
        )
        try:
            case = {"debtor": {"name": "ACME"}, "claims": [{"amount": 100}]}
            ok = await anyio.to_thread.run_sync(api.call, "POST", "/cases", case, "t-1")
            assert ok.status_code == 201 and ok.json()["externalTenantId"] == "t-1"
            # The partner revokes the current token: one retry with a fresh one works.
            rt = jobs[("debitura", "t-1")]
            old = rt.token
            debitura.revoke(old.value)
            retried = await anyio.to_thread.run_sync(api.call, "POST", "/cases", case, "t-1")
            assert retried.status_code == 201 and rt.token is not old
            assert [r.status for r in debitura.requests if r.path == "/cases" and r.client in ("t-1", None)] == [201, 401, 201]
            # An invalid link: 401, a fresh token, 401 again -> the daemon marks it.
            with pytest.raises(example.LinkInvalidError):
                await anyio.to_thread.run_sync(api.call, "POST", "/cases", case, "t-unlinked")
            assert jobs[("debitura", "t-unlinked")].state == "invalid_link"
            assert jobs[("debitura", "t-1")].valid(daemon.clock.now())
        finally:
            api.close()
        # The curl one-liner reports the same way.
        rt = jobs[("debitura", "t-2")]
        with anyio.fail_after(30):
            out = await anyio.run_process(
                ["sh", str(EXAMPLES / "report-rejected.sh"), str(tmp_path / "t-2.json"), "debitura",
                 "t-2", f"http://127.0.0.1:{daemon.port}"],
                check=False,
            )
        assert out.returncode == 0, out.stdout + out.stderr
        answer = json.loads(out.stdout)
        assert answer["minted"] is True and answer["fingerprint"] == rt.token.fingerprint()
    leak_guard.extra_outputs.append((out.stdout + out.stderr).decode())
    assert DEB_KEY.encode() not in out.stdout
