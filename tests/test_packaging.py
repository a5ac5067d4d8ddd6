"""The built wheel installs under one import package and runs from a clean virtual environment."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installs_and_runs_in_clean_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), REPO],
                   check=True, capture_output=True)
    (wheel,) = dist.glob("asbuilt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"asbuilt"}, tops  # nothing generic at the top of site-packages
    assert "asbuilt/agent/cli.py" in names and "asbuilt/probes/base.py" in names
    assert any(n.endswith(".bpf.c") for n in names), "eBPF sources ship in the wheel"

    venv = tmp_path / "venv"
    # --system-site-packages: the same way scripts/setup makes bcc (Debian's) visible.
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [str(wheel)], check=True, capture_output=True)
    exe = str(venv / "bin" / "asbuilt")
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert out.returncode == 0 and out.stdout.startswith("asbuilt "), out
    # imported from the venv, not from the checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import asbuilt.agent; print(asbuilt.agent.__file__)"],
                           capture_output=True, text=True, cwd=str(tmp_path), env=env, check=True).stdout
    assert str(venv) in where
    prof = tmp_path / "self.json"
    r = subprocess.run([exe, "scan", "--pid", "1", "--no-verify", "-o", str(prof)], capture_output=True, text=True,
                       cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "show", str(prof)], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert r.returncode == 0 and "Coverage" in r.stdout, r.stderr
