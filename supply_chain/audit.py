"""The lock's supply-chain checks, run by `scripts/dev test` before the test suite.

    .venv/bin/python -m supply_chain.audit [requirements.lock]

Offline, always: every pinned package carries a sha256 hash, and no pin falls in an
advisory of the checked-in snapshot (supply_chain/advisories.json) unless accepted there
with a reason. Online, when it can: pip-audit over the lock; what it could not audit, and
why, is printed, and so is a skip when there is no network. Exit status 1 on a finding.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
ADVISORIES = Path(__file__).resolve().parent / "advisories.json"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)")


@dataclass(frozen=True)
class Pin:
    name: str  # normalised (PEP 503)
    version: str
    hashes: int


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> list[Pin]:
    """Each `name==version` entry of a pip-compile/uv lock with its `--hash` lines."""
    pins: list[Pin] = []
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = _PIN.match(block.strip())
        if match:
            pins.append(Pin(normalise(match[1]), match[2], block.count("--hash=sha256:")))
    return pins


def offline_findings(pins: list[Pin], snapshot: dict[str, object]) -> list[str]:
    accepted = {(a["id"], normalise(a["package"])) for a in snapshot.get("accepted", [])}  # type: ignore[attr-defined]
    findings = [f"{p.name}=={p.version} has no sha256 hash in the lock" for p in pins if p.hashes == 0]
    for advisory in snapshot["advisories"]:  # type: ignore[attr-defined]
        package = normalise(advisory["package"])
        affected = [SpecifierSet(spec) for spec in advisory["affected"]]  # any of them
        for pin in pins:
            if pin.name == package and any(Version(pin.version) in spec for spec in affected):
                if (advisory["id"], package) not in accepted:
                    findings.append(f"{pin.name}=={pin.version}: {advisory['id']}: {advisory['summary']}")
    return findings


def pip_audit(lock: Path, accepted: set[str]) -> tuple[list[str], str]:
    """(findings, what to print); never raises: no network is a printed skip, not a pass."""
    command = [sys.executable, "-m", "pip_audit", "-r", str(lock), "--no-deps", "--disable-pip",
               "--progress-spinner", "off", "-f", "json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        report = json.loads(done.stdout)
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        reason = (getattr(exc, "stderr", None) or "").strip().splitlines()[-1:] or [type(exc).__name__]
        return [], f"pip-audit skipped: could not reach a vulnerability service ({reason[0][:160]})"
    except OSError as exc:
        return [], f"pip-audit skipped: {exc}"
    findings, skipped, audited = [], [], 0
    for dep in report.get("dependencies", []):
        if "skip_reason" in dep:
            skipped.append(dep["name"])
            continue
        audited += 1
        for vuln in dep.get("vulns", []):
            if vuln["id"] not in accepted and not set(vuln.get("aliases", [])) & accepted:
                findings.append(f"{dep['name']}=={dep['version']}: {vuln['id']} (fix: {', '.join(vuln.get('fix_versions', [])) or 'none'})")
    line = f"pip-audit (PyPI advisory service): {audited} packages audited, {len(findings)} unaccepted finding(s)"
    if skipped:
        line += (f"; {len(skipped)} could not be audited, the service has no record of their pinned versions "
                 f"(e.g. {', '.join(skipped[:3])}): only the offline snapshot covered those")
    return findings, line


def main(argv: list[str]) -> int:
    lock = Path(argv[1]) if len(argv) > 1 else ROOT / "requirements.lock"
    pins = read_lock(lock.read_text(encoding="utf-8"))
    snapshot = json.loads(ADVISORIES.read_text(encoding="utf-8"))
    findings = offline_findings(pins, snapshot)
    print(f"audit: {len(pins)} pins, all hashed: {all(p.hashes for p in pins)}; "
          f"offline snapshot of {snapshot['taken']}: {len(snapshot['advisories'])} advisories, {len(findings)} finding(s)")
    online, line = pip_audit(lock, {a["id"] for a in snapshot["accepted"]})
    print(f"audit: {line}")
    for finding in findings + online:
        print(f"audit: FINDING {finding}")
    return 1 if findings or online else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
