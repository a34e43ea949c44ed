"""A first run from anywhere: the package built and installed into a fresh venv, then
`abc-gateway demo` run from an empty directory, with no settings file in sight.

Offline: the project is built from a copy of what the Dockerfile copies (pyproject,
README, gateway/, plugins/) with `pip install --no-deps --no-index --no-build-isolation`;
its dependencies are the ones already installed in the test's venv, made visible to the
fresh venv by a .pth line. That line adds a directory to sys.path and nothing more (the
.pth files inside it, such as the dev venv's editable install, are not run), so the
gateway the demo imports is the installed copy, which the test checks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import ROOT
from tests.e2e.test_serve_process import clean_env, pids_mentioning


def test_pip_install_then_demo_from_an_empty_directory(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("gateway", "plugins"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True, check=True,
    ).stdout.strip())
    dependencies = {sysconfig.get_path("purelib"), *site.getsitepackages()}
    (purelib / "dev-dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    env = clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", str(source)],
        cwd=tmp_path, env=env, check=True, timeout=300,
    )
    shutil.rmtree(source)  # nothing may be read from the source tree any more

    empty = tmp_path / "anywhere"
    empty.mkdir()
    where = subprocess.run([python, "-c", "import gateway; print(gateway.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(purelib)
    try:
        done = subprocess.run([venv / "bin" / "abc-gateway", "demo"], cwd=empty, env=env,
                              capture_output=True, text=True, timeout=90)
    finally:
        for pid in pids_mentioning(str(empty)):  # a failed run must not leave its redis-server behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert done.returncode == 0, done.stdout + done.stderr
    # The same Assembly as the repository's own demo: the shipped settings and plan agree with config/.
    assert "support-bot.yaml -> asm_33387b12578f05741d0909a32438fb8b" in done.stdout
    assert "== journal verify" in done.stdout and '"integrity": "ok"' in done.stdout
    assert sorted(p.name for p in empty.iterdir()) == ["var"]  # the embedded Redis's data, nothing else
