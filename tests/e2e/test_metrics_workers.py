"""/metrics under `serve --workers 2`: whichever worker answers the scrape, the counters
are the sum over both (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from tests.e2e.test_serve_process import PLAN, Launcher, admin, listeners, secrets_env, wait_ready
from tests.metrics_support import counter

CALLS = 200


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.cleanup()


def served_by(path: Path) -> float:
    """Chat calls one worker counted, read from its own file alone."""
    for family in MultiProcessCollector.merge([str(path)], accumulate=True):
        if family.name == "abc_requests":
            return sum(s.value for s in family.samples if s.name == "abc_requests_total" and s.labels.get("route") == "/v1/chat/completions")
    return 0.0


def test_two_workers_report_the_sum_of_their_counters(launcher: Launcher, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"a previous run's leftovers, not a valid file")
    served = launcher.spawn("--workers", "2", env=secrets_env(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)))
    wait_ready(served, timeout_s=60)
    deadline = time.monotonic() + 60
    while listeners(served.port) < 2 and time.monotonic() < deadline:  # both workers, not just the first
        time.sleep(0.05)
    with admin(served.base_url) as a:
        assembly_id = a.post("/admin/v1/plans/compile", json=PLAN).json()["assembly_id"]
        token = a.post("/admin/v1/sessions", json={"assembly_id": assembly_id}).json()["token"]
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    # A new connection per call: SO_REUSEPORT spreads connections, not requests, over workers.
    with httpx.Client(base_url=served.base_url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for _ in range(CALLS):
            response = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200, response.text
        scrapes = [client.get("/metrics").text for _ in range(6)]

    files = sorted(metrics_dir.glob("counter_*.db"))
    assert len(files) == 2 and metrics_dir / "counter_1.db" not in files  # one per worker; the stale file went
    per_worker = [served_by(path) for path in files]
    assert all(0 < n < CALLS for n in per_worker) and sum(per_worker) == CALLS  # both served a share
    for text in scrapes:
        assert counter(text, "abc_requests_total", route="/v1/chat/completions", status="200") == CALLS
        assert counter(text, "gen_ai_server_request_duration_seconds_count", gen_ai_request_model="gpt-4o-mini") == CALLS
        assert counter(text, "abc_requests_in_flight") == 1  # the scrape itself
    assert served.stop() == 0
