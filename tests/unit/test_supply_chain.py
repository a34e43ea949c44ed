"""The lock is hash-pinned and never holds a known-bad version (litellm 1.82.7 and 1.82.8
above all); supply_chain/audit.py, run by the test command, finds what these tests plant."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from supply_chain.audit import ADVISORIES, offline_findings, read_lock

ROOT = Path(__file__).resolve().parents[2]
LOCK = read_lock((ROOT / "requirements.lock").read_text(encoding="utf-8"))
SNAPSHOT = json.loads(ADVISORIES.read_text(encoding="utf-8"))
PLANTED = """\
aiohttp==3.14.5 \\
    --hash=sha256:00
litellm==1.82.8 \\
    --hash=sha256:11
unhashed==1.0
"""


def test_every_lock_entry_has_a_hash() -> None:
    assert len(LOCK) > 50
    assert [p.name for p in LOCK if p.hashes == 0] == []


def test_the_backdoored_litellm_releases_are_never_locked() -> None:
    litellm = [p.version for p in LOCK if p.name == "litellm"]
    assert litellm and not set(litellm) & {"1.82.7", "1.82.8"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert f"litellm=={litellm[0]}" in pyproject["project"]["dependencies"]  # pinned exactly


def test_the_lock_matches_no_advisory_of_the_snapshot() -> None:
    assert offline_findings(LOCK, SNAPSHOT) == []


def test_the_checker_finds_a_bad_litellm_and_an_unhashed_pin() -> None:
    findings = offline_findings(read_lock(PLANTED), SNAPSHOT)
    assert any(f.startswith("litellm==1.82.8: LOCAL-litellm-backdoor") for f in findings)
    assert "unhashed==1.0 has no sha256 hash in the lock" in findings
    assert not any(f.startswith("aiohttp") for f in findings)


def test_an_accepted_finding_is_documented_with_a_reason() -> None:
    for accepted in SNAPSHOT["accepted"]:
        assert accepted.get("reason"), accepted
    bad_litellm = [a for a in SNAPSHOT["advisories"] if a["package"] == "litellm"]
    accepted = {**SNAPSHOT, "accepted": [{"id": bad_litellm[0]["id"], "package": "litellm", "reason": "test"}]}
    assert not any(f.startswith("litellm") for f in offline_findings(read_lock(PLANTED), accepted))
