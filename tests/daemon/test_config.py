"""A config thawd will not run with gets one line naming the key and what to write, exit 2,
from `thawd --check-config` and from a start alike; the documented configs run as documented.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon.conftest import ROOT, ThawdProcess, make_dir, write_snapshot
from thaw.client import connect
from thawd import config


def thawd(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "thawd", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)  # fmt: skip


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# (what the file says, what the line must say); {dir} is a directory that exists.
BAD = [
    ('pinned_budget = "8GiB\n', "not valid TOML: "),
    ('socket_group = "no-such-group-thaw"\n',
     'socket_group = "no-such-group-thaw": no such group; write an existing group'),
    ('socket_mode = "0x660"\n', 'socket_mode = "0x660": write the mode in octal, as a string'),
    ('socket_mode = "0666 "\n', 'socket_mode = "0666 ": write the mode in octal'),
    ('log_level = "verbose"\n',
     'log_level = "verbose": write one of "debug", "info", "warning", "error"'),
    ('pinned_budgte = "8GiB"\n', "unknown key pinned_budgte: did you mean pinned_budget?"),
    ('pinned_budget = "lots"\n', 'pinned_budget = "lots": write a size'),
    ("io_threads = true\n", "io_threads = true: write a whole number from 1 to 256"),
    ('allow_uids = ["alice"]\n', 'allow_uids = ["alice"]: write a list of numeric ids'),
    ('socket = "{dir}/missing/thawd.sock"\n',
     'socket = "{dir}/missing/thawd.sock": no directory {dir}/missing; create it'),
    ('socket = "relative.sock"\n', 'socket = "relative.sock": write an absolute path'),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line"), BAD, ids=[b[1].split(":")[0][:24] for b in BAD])
def test_a_bad_config_is_one_line_and_exit_2(tmp_path: Path, text: str, line: str) -> None:
    path = tmp_path / "thawd.toml"
    base = f'state_dir = "{tmp_path}/state"\n'
    if "socket =" not in text:
        base += f'socket = "{tmp_path}/thawd.sock"\n'
    path.write_text(base + text.format(dir=tmp_path))
    for flag in ("--check-config", "--config"):
        out = thawd(flag, str(path))
        assert out.returncode == 2, out.stdout + out.stderr
        assert one_line(out.stderr).startswith(f"thawd: {path}: {line.format(dir=tmp_path)}")
        assert out.stdout == ""
    # Nothing was made: not the socket's directory, not the state directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thawd.toml"]


def test_a_state_dir_thawd_cannot_make_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "thawd.toml"
    (tmp_path / "file").write_text("")
    path.write_text(f'socket = "{tmp_path}/s.sock"\nstate_dir = "{tmp_path}/file/state"\n')
    out = thawd("--check-config", str(path))
    assert out.returncode == 2
    assert one_line(out.stderr).endswith(
        f'state_dir = "{tmp_path}/file/state": {tmp_path}/file is not a directory; write a '
        "directory thawd owns or can create")  # fmt: skip


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    out = thawd("--config", str(tmp_path / "nope.toml"))
    assert out.returncode == 2
    assert one_line(out.stderr) == f"thawd: {tmp_path}/nope.toml: cannot read the config: " \
        "No such file or directory"  # fmt: skip


def test_check_config_says_ok_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "thawd.toml"
    path.write_text(f'socket = "{tmp_path}/thawd.sock"\nstate_dir = "{tmp_path}/state"\n'
                    'socket_mode = "0640"\nlog_level = "debug"\n')  # fmt: skip
    out = thawd("--check-config", str(path))
    assert (out.returncode, out.stdout, out.stderr) == (0, "ok\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thawd.toml"]


def test_the_shipped_config_names_every_key_with_its_default() -> None:
    """systemd/thawd.toml is "every key with its default" (and the socket group)."""
    shipped = config.load(ROOT / "systemd" / "thawd.toml")
    assert shipped == dataclasses.replace(config.Config(), socket_group="thaw")
    keys = set(re.findall(r"^([a-z0-9_]+) =", (ROOT / "systemd/thawd.toml").read_text(), re.M))
    assert keys == {f.name for f in dataclasses.fields(config.Config)}


def documented_by_hand_config() -> str:
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    block = re.search(r"cat > ~/\.config/thawd\.toml <<'TOML'\n(.*?)\n\s*TOML\n", text, re.S)
    assert block is not None, "docs/OPERATIONS.md lost its by-hand config"
    return "\n".join(line.strip() for line in block.group(1).splitlines()) + "\n"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run thawd as another user")
def test_the_documented_by_hand_config_runs_thawd_as_a_user() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed (util-linux)")
    wrapper = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    if subprocess.run([*wrapper, sys.executable, "-c", "import thawd"], cwd=ROOT,
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("nobody cannot run this Python (it lives under a private directory)")
    directory = make_dir()
    runtime, home = directory / "run-user", directory / "home"
    for d in (runtime / "thawd", home / ".config"):
        d.mkdir(parents=True)
    for d in (runtime, runtime / "thawd", home, home / ".config"):
        os.chown(d, 65534, 65534)
    daemon = ThawdProcess(directory, wrapper=wrapper)
    daemon.config_path = home / ".config" / "thawd.toml"
    text = documented_by_hand_config()
    daemon.config_path.write_text(
        text.replace("/run/user/1000", str(runtime)).replace("/home/alice", str(home))
    )
    daemon.socket = str(runtime / "thawd" / "thawd.sock")
    try:
        check = subprocess.run([*wrapper, sys.executable, "-m", "thawd", "--check-config",
                                str(daemon.config_path)], capture_output=True, text=True,
                               cwd=ROOT)  # fmt: skip
        assert (check.returncode, check.stdout) == (0, "ok\n"), check.stderr
        daemon.start(notify_address=f"@thaw-test-{directory.name}")  # any uid may send there
        snapshot = write_snapshot(directory / "s.thaw", {"w": __import__("torch").ones(1000)})
        os.chmod(snapshot, 0o644)
        with connect(daemon.socket) as c:
            c.register(str(snapshot), "s")
            c.pin("s")
            status = c.status()
            assert (status.pid, status.pinned_budget) == (daemon.pid, 2 << 30)
            assert c.stat("s").tier == "pinned"
        assert (home / ".local/state/thawd/registry.sqlite3").stat().st_uid == 65534
        assert os.stat(daemon.socket).st_uid == 65534
        assert daemon.stop() == 0
    finally:
        daemon.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_metrics_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """What only binding can tell still ends in one line, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "thawd.toml"
        path.write_text(f'socket = "{tmp_path}/thawd.sock"\nstate_dir = "{tmp_path}/state"\n'
                        f'pool = "memfd"\nmetrics_port = {port}\n')  # fmt: skip
        out = thawd("--config", str(path))
    assert out.returncode == 2
    assert one_line(out.stderr) == (f"thawd: {path}: metrics_port = {port}: Address already in "
                                    "use; write a free port, or 0 for no metrics")  # fmt: skip
