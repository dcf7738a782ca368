"""`make install-service` as systemd will read it: the unit, the user, the directories.

`make install-unit DESTDIR=...` stages every file the service install writes; systemd's own
tools check them offline (systemd-analyze verify, systemd-sysusers/-tmpfiles --root). Booting
the unit needs systemd as PID 1, which a test container does not have: not done here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon.conftest import ROOT

UNIT = "etc/systemd/system/thawd.service"


def install_unit(destdir: Path) -> None:
    """Stage the service files, with this test environment's thawd as ExecStart."""
    subprocess.run(["make", "-s", "install-unit", f"DESTDIR={destdir}",
                    f"SERVICE_VENV={sys.prefix}"], cwd=ROOT, check=True,
                   capture_output=True, timeout=60)  # fmt: skip


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install systemd)")
    return path


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    install_unit(tmp_path)
    return tmp_path


def unit_values(text: str, key: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"^{key}=(.*)$", text, re.MULTILINE)]


def test_the_unit_starts_the_installed_thawd_by_its_absolute_path(staged: Path) -> None:
    """systemd's PATH has no venv: `/usr/bin/env thawd` exited 127 there."""
    unit = (staged / UNIT).read_text()
    assert "@" not in unit.replace("$MAINPID", "")  # every template field was filled
    (exec_start,) = unit_values(unit, "ExecStart")
    thawd = Path(exec_start.split()[0])
    assert thawd == Path(sys.prefix) / "bin" / "thawd"
    assert thawd.is_file() and thawd.stat().st_mode & 0o111
    assert exec_start.split()[1:] == ["--config", "/etc/thawd/thawd.toml"]
    assert unit_values(unit, "ExecReload") == ["/bin/kill -HUP $MAINPID"]  # thawd reloads
    assert unit_values(unit, "WatchdogSec") == ["60s"]  # thawd pings
    assert unit_values(unit, "RestartPreventExitStatus") == ["2"]  # a config to fix first
    assert (staged / "etc/thawd/thawd.toml").is_file()


def test_documentation_points_at_installed_files(staged: Path) -> None:
    (line,) = unit_values((staged / UNIT).read_text(), "Documentation")
    urls = line.split()
    assert urls and all(u.startswith("file:///") for u in urls)
    for url in urls:
        assert (staged / url.removeprefix("file:///")).is_file(), url


def test_systemd_analyze_verifies_the_unit(staged: Path) -> None:
    analyze = systemd_tool("systemd-analyze")
    out = subprocess.run([analyze, "verify", str(staged / UNIT)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    # verify reports unknown keys and values only as warnings: any output is a defect.
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_sysusers_and_tmpfiles_make_the_user_group_and_directories(staged: Path) -> None:
    sysusers = systemd_tool("systemd-sysusers")
    tmpfiles = systemd_tool("systemd-tmpfiles")
    subprocess.run([sysusers, f"--root={staged}", str(staged / "usr/lib/sysusers.d/thawd.conf")],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    passwd = (staged / "etc/passwd").read_text().splitlines()
    groups = {line.split(":")[0] for line in (staged / "etc/group").read_text().splitlines()}
    (thawd,) = [line.split(":") for line in passwd if line.startswith("thawd:")]
    assert thawd[5:] == ["/var/lib/thawd", "/usr/sbin/nologin"]
    assert {"thawd", "thaw"} <= groups  # thaw: socket_group of the shipped config
    subprocess.run([tmpfiles, f"--root={staged}", "--create",
                    str(staged / "usr/lib/tmpfiles.d/thawd.conf")], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    state = staged / "var/lib/thawd"
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o750
    assert state.stat().st_uid == int(thawd[2])


def test_reinstalling_keeps_the_operators_config(staged: Path) -> None:
    config = staged / "etc/thawd/thawd.toml"
    config.write_text('pinned_budget = "64GiB"\n')
    install_unit(staged)
    assert config.read_text() == 'pinned_budget = "64GiB"\n'
