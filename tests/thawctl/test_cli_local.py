"""thawctl without a daemon: help, usage errors, exit code 3, info/verify of files, completion,
freeze, demo, and the progress display."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from thawctl_testlib import (
    FILE_INFO_KEYS,
    NO_DAEMON,
    TENSOR_KEYS,
    VERIFY_KEYS,
    assert_keys,
    corrupt_payload,
    one_error_line,
    run_subprocess,
)

from thawctl import exitcodes
from thawctl.progress import Progress

# --- entry points -------------------------------------------------------------------------------


def test_help_in_a_fresh_interpreter_lists_commands_and_exit_codes() -> None:
    done = run_subprocess("--help")
    assert done.returncode == 0, done.stderr
    for command in (
        "status",
        "ls",
        "info",
        "register",
        "pin",
        "unpin",
        "rm",
        "verify",
        "freeze",
        "bench",
        "demo",
        "top",
        "completion",
    ):
        assert command in done.stdout
    assert "exit codes:" in done.stdout
    for code in range(8):
        assert f"  {code}  " in done.stdout


def test_console_script_is_installed_and_runs() -> None:
    script = shutil.which("thawctl") or str(Path(__import__("sys").executable).parent / "thawctl")
    if not Path(script).exists():
        pytest.skip("thawctl console script not installed (pip install -e .)")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith("thawctl ")


def test_every_subcommand_has_help(thawctl: Any) -> None:
    for command in (
        "status",
        "ls",
        "info",
        "register",
        "pin",
        "unpin",
        "rm",
        "verify",
        "freeze",
        "bench",
        "demo",
        "top",
        "completion",
    ):
        result = thawctl(command, "--help")
        assert result.code == 0
        assert result.out.startswith(f"usage: thawctl {command}")


# --- usage --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "--bogus"],
        ["nosuchcommand"],
        [],
        ["pin"],
        ["register", "x.thaw", "--label", "novalue"],
        ["freeze", "--model", "tiny"],
        ["bench", "--tier", "nope"],
        ["completion", "powershell"],
    ],
)
def test_bad_usage_exits_2_with_one_line(thawctl: Any, argv: Any) -> None:
    result = thawctl(*argv)
    assert result.code == exitcodes.USAGE
    one_error_line(result.err)
    assert result.out == ""


# --- no daemon ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "--json"],
        ["ls"],
        ["info", "somename"],
        ["register", "/tmp/x.thaw"],
        ["pin", "somename"],
        ["unpin", "somename"],
        ["rm", "somename"],
        ["verify", "somename"],
    ],
)
def test_no_daemon_exits_3_and_says_how_to_start_it(thawctl: Any, argv: Any) -> None:
    result = thawctl("--socket", NO_DAEMON, *argv)
    assert result.code == exitcodes.DAEMON_UNAVAILABLE
    line = one_error_line(result.err)
    assert "systemctl start thawd" in line
    assert result.out == ""


def test_no_daemon_in_a_fresh_interpreter() -> None:
    done = run_subprocess("ls", "--json", env={"THAW_SOCKET": NO_DAEMON})
    assert done.returncode == 3
    one_error_line(done.stderr)
    assert done.stdout == ""


def test_a_wrong_socket_path_says_what_is_wrong_with_it(thawctl: Any, tmp_path: Path) -> None:
    """Not the derived fd socket's errno: what the path the operator gave is."""
    import socket as sockets

    regular = tmp_path / "regular.sock"
    regular.write_text("not a socket")
    listener = sockets.socket(sockets.AF_UNIX)  # some other program's socket
    listener.bind(str(tmp_path / "other.sock"))
    listener.listen()
    stale = sockets.socket(sockets.AF_UNIX)  # bound, then closed: nobody listens
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    expected = {
        "regular.sock": "is a regular file, not a socket",
        "other.sock": "accepts connections but is not thawd's",
        "stale.sock": "is a socket nobody listens on",
        ".": "is a directory, not a socket",
    }
    try:
        for name, words in expected.items():
            path = str(tmp_path / name) if name != "." else str(tmp_path)
            result = thawctl("--socket", path, "status")
            assert result.code == exitcodes.DAEMON_UNAVAILABLE, result.err
            line = one_error_line(result.err)
            assert f"no thawd at {path}: {path} {words}" in line
            assert ".fd.sock (" not in line and "No such file" not in line
    finally:
        listener.close()


def test_timeout_must_be_positive(thawctl: Any) -> None:
    for value in ("0", "-1", "soon"):
        result = thawctl("--timeout", value, "status")
        assert result.code == exitcodes.USAGE
        assert "positive number of seconds" in one_error_line(result.err)


def test_socket_after_the_subcommand_wins(thawctl: Any) -> None:
    result = thawctl("--socket", "/elsewhere.sock", "status", "--socket", NO_DAEMON)
    assert result.code == 3
    assert NO_DAEMON in result.err


# --- info and verify of a file -------------------------------------------------------------------


def test_info_file_json_schema(thawctl: Any, snapshot_file: Any) -> None:
    result = thawctl("info", str(snapshot_file), "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["source"] == "file"
    assert doc["snapshot"] is None
    info = doc["file"]
    assert_keys(info, FILE_INFO_KEYS)
    assert info["path"] == str(snapshot_file.resolve())
    assert info["tensor_count"] == 4
    assert info["format_version"] == 1
    assert {t["name"] for t in info["tensors"]} == {
        "embed.weight",
        "layers.0.norm",
        "layers.0.proj",
        "layers.0.index",
    }
    for t in info["tensors"]:
        assert_keys(t, TENSOR_KEYS)
        assert len(t["checksum"]) == 16
    assert info["fingerprint"]["model"] == "fixture"
    assert sum(info["bytes_by_dtype"].values()) == info["tensor_bytes"]


def test_info_file_for_people(thawctl: Any, snapshot_file: Any) -> None:
    result = thawctl("info", str(snapshot_file))
    assert result.code == 0
    assert "layers.0.proj" in result.out
    assert "float16" in result.out
    assert "xxh3-tree-16M" in result.out
    summary = thawctl("info", str(snapshot_file), "--summary")
    assert "layers.0.proj" not in summary.out


def test_verify_file_ok(thawctl: Any, snapshot_file: Any) -> None:
    result = thawctl("verify", str(snapshot_file), "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert_keys(doc, VERIFY_KEYS)
    assert doc["ok"] is True and doc["mismatches"] == []
    assert doc["source"] == "file" and doc["name"] is None
    assert doc["tensor_count"] == 4
    human = thawctl("verify", str(snapshot_file))
    assert human.code == 0 and "4 tensors verified" in human.out


def test_verify_corrupt_payload_exits_7_naming_the_tensor(thawctl: Any, snapshot_file: Any) -> None:
    corrupt_payload(snapshot_file, "layers.0.proj")
    result = thawctl("verify", str(snapshot_file), "--json")
    assert result.code == exitcodes.SNAPSHOT_CORRUPT
    doc = result.json()
    assert doc["ok"] is False
    assert [m["tensor"] for m in doc["mismatches"]] == ["layers.0.proj"]
    assert "layers.0.proj" in one_error_line(result.err)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header"])
def test_damaged_file_is_refused_with_one_line(
    thawctl: Any, snapshot_file: Any, damage: Any
) -> None:
    data = snapshot_file.read_bytes()
    if damage == "garbage":
        snapshot_file.write_bytes(b"not a snapshot at all" * 10)
    elif damage == "truncated":
        snapshot_file.write_bytes(data[: len(data) // 2])
    else:
        snapshot_file.write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])
    for command in ("info", "verify"):
        result = thawctl(command, str(snapshot_file))
        assert result.code == exitcodes.SNAPSHOT_CORRUPT, (command, result.err)
        assert str(snapshot_file) in one_error_line(result.err)


def test_missing_file_exits_4(thawctl: Any, tmp_path: Path) -> None:
    result = thawctl("info", str(tmp_path / "absent.thaw"))
    assert result.code == exitcodes.NOT_FOUND
    one_error_line(result.err)


# --- completion ---------------------------------------------------------------------------------


def test_bash_completion_is_valid_bash(thawctl: Any, tmp_path: Path) -> None:
    result = thawctl("completion", "bash")
    assert result.code == 0
    script = tmp_path / "thawctl.bash"
    script.write_text(result.out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "complete -o filenames -F _thawctl thawctl" in result.out
    for word in ("freeze", "--tensor-parallel-size", "file-warm", "thawctl ls -q"):
        assert word in result.out


def test_bash_completion_completes_commands(thawctl: Any, tmp_path: Path) -> None:
    script = tmp_path / "thawctl.bash"
    script.write_text(thawctl("completion", "bash").out)
    probe = (
        f"source {script}; COMP_WORDS=(thawctl fre); COMP_CWORD=1; _thawctl; "
        'echo "${COMPREPLY[@]}"; COMP_WORDS=(thawctl freeze --eng); COMP_CWORD=2; _thawctl; '
        'echo "${COMPREPLY[@]}"; COMP_WORDS=(thawctl freeze --engine ""); COMP_CWORD=3; '
        '_thawctl; echo "${COMPREPLY[@]}"'
    )
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True)
    assert done.stdout.splitlines() == ["freeze", "--engine", "torch vllm sglang"], done.stderr


def test_zsh_completion(thawctl: Any) -> None:
    result = thawctl("completion", "zsh")
    assert result.code == 0
    assert result.out.startswith("#compdef thawctl")
    assert "_thawctl_snapshots" in result.out and "'freeze:" in result.out
    if shutil.which("zsh"):
        assert subprocess.run(["zsh", "-n"], input=result.out, text=True).returncode == 0


def test_fish_completion_is_valid_fish_and_completes(thawctl: Any, tmp_path: Path) -> Any:
    result = thawctl("completion", "fish")
    assert result.code == 0
    assert result.out.startswith("# fish completion for thawctl")
    for line in (
        "complete -c thawctl -n '__thawctl_using ls' -l tier -x -a 'cold warm pinned'",
        "complete -c thawctl -n '__thawctl_using freeze' -s o -l output -r -F",
        "complete -c thawctl -n '__thawctl_using pin' -F -a '(__thawctl_snapshots)'",
    ):
        assert line in result.out
    if not shutil.which("fish"):
        pytest.skip("fish is not installed: the script's behaviour is not checked")
    script = tmp_path / "thawctl.fish"
    script.write_text(result.out)
    assert subprocess.run(["fish", "-n", str(script)]).returncode == 0

    def complete(line: str) -> list[str]:
        done = subprocess.run(
            ["fish", "-c", f"source {script}; complete -C {line!r}"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert done.stderr == "", done.stderr
        return [c.split("\t")[0] for c in done.stdout.splitlines()]

    assert complete("thawctl fre") == ["freeze"]
    assert "doctor" in complete("thawctl ")
    # A global option's value is not the command word.
    assert complete("thawctl --socket /x.sock --timeout 3 freeze --eng") == ["--engine"]
    assert complete("thawctl freeze --engine ") == ["sglang", "torch", "vllm"]
    assert complete("thawctl completion ") == ["bash", "fish", "zsh"]
    (tmp_path / "model.thaw").write_text("")
    assert "model.thaw" in complete("thawctl pin mod")  # files, quietly no names without thawctl


# --- freeze and demo (the tiny model: transformers, no download) --------------------------------


def test_freeze_tiny_with_torch(thawctl: Any, snapshot_dir: Any) -> None:
    out = snapshot_dir / "tiny.thaw"
    result = thawctl("freeze", "--model", "tiny", "-o", str(out), "--label", "run=test", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert {
        "engine",
        "model",
        "dtype",
        "tensor_parallel_size",
        "load_seconds",
        "freeze",
        "fingerprint",
        "files",
    } <= doc.keys()
    assert doc["engine"] == "torch" and doc["model"] == "tiny"
    assert doc["fingerprint"]["architecture"] == "LlamaForCausalLM"
    assert doc["fingerprint"]["labels"] == {"run": "test"}
    assert doc["files"][0]["path"] == str(out.resolve())
    assert doc["freeze"]["bytes"] > 1_000_000
    # One word per concept: "size" is the payload, as pin and ls say it; the file is labelled.
    entry = doc["files"][0]
    assert doc["freeze"]["bytes"] <= entry["size_bytes"] < entry["file_bytes"]
    assert thawctl("verify", str(out)).code == 0
    again = thawctl("freeze", "--model", "tiny", "-o", str(out))
    assert again.code == exitcodes.ERROR and "--force" in one_error_line(again.err)
    half = thawctl(
        "freeze", "--model", "tiny", "-o", str(snapshot_dir / "h.thaw"), "--dtype", "float16"
    )
    assert half.code == 0, half.err
    assert "float16" in thawctl("info", str(snapshot_dir / "h.thaw"), "--summary").out
    from thawctl import render

    info = thawctl("info", str(snapshot_dir / "h.thaw"), "--json").json()["file"]
    size, file = render.size(info["payload_bytes"]), render.size(info["file_bytes"])
    assert f": size {size} in {info['tensor_count']} tensors, file {file}" in half.out


def test_dtype_auto_is_the_checkpoints(snapshot_dir: Any) -> None:
    """What `freeze --engine vllm|sglang --dtype auto` asks the engine for: config.json's."""
    import json as json_

    from thaw.demo import tiny
    from thawctl.freeze import checkpoint_dtype

    model_dir = tiny.write_model_dir(snapshot_dir / "tiny-model")
    assert checkpoint_dtype(str(model_dir)) == "float32"
    config = json_.loads((model_dir / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "float16"  # transformers 5 writes `dtype`
    (model_dir / "config.json").write_text(json_.dumps(config))
    assert checkpoint_dtype(str(model_dir)) == "float16"
    config.pop("dtype")
    (model_dir / "config.json").write_text(json_.dumps(config))
    assert checkpoint_dtype(str(model_dir)) == "auto"  # none recorded: the engine decides
    assert checkpoint_dtype(str(snapshot_dir / "absent")) == "auto"


def test_freeze_from_a_model_directory(thawctl: Any, snapshot_dir: Any) -> None:
    from thaw.demo import tiny

    model_dir = tiny.write_model_dir(snapshot_dir / "tiny-model")
    out = snapshot_dir / "from-dir.thaw"
    result = thawctl("freeze", "--model", str(model_dir), "-o", str(out), "--json")
    assert result.code == 0, result.err
    assert result.json()["fingerprint"]["model"] == "tiny-model"
    direct = snapshot_dir / "direct.thaw"
    assert thawctl("freeze", "--model", "tiny", "-o", str(direct)).code == 0
    a = thawctl("info", str(out), "--json").json()["file"]["tensors"]
    b = thawctl("info", str(direct), "--json").json()["file"]["tensors"]
    assert [t["checksum"] for t in a] == [t["checksum"] for t in b]  # same weights, same bytes


def test_freeze_errors(thawctl: Any, snapshot_dir: Any) -> None:
    missing = thawctl("freeze", "--model", "./no/such/dir", "-o", str(snapshot_dir / "x.thaw"))
    assert missing.code == exitcodes.NOT_FOUND
    one_error_line(missing.err)
    tp = thawctl("freeze", "--model", "tiny", "--tp", "2", "-o", str(snapshot_dir / "x.thaw"))
    assert tp.code == exitcodes.USAGE
    one_error_line(tp.err)
    nodir = thawctl("freeze", "--model", "tiny", "-o", str(snapshot_dir / "no" / "x.thaw"))
    assert nodir.code == exitcodes.NOT_FOUND


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_freeze_with_an_engine_that_is_not_installed(
    thawctl: Any, snapshot_dir: Any, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine package is absent (None in sys.modules makes its import fail), as on a host
    # where thaw is installed without that extra; thaw's own integration is real.
    for name in list(sys.modules):
        if name == engine or name.startswith(f"{engine}."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, engine, None)
    result = thawctl(
        "freeze", "--engine", engine, "--model", "tiny", "-o", str(snapshot_dir / "e.thaw")
    )
    assert result.code == exitcodes.ERROR
    assert f"install thaw[{engine}]" in one_error_line(result.err)
    assert not (snapshot_dir / "e.thaw").exists()


def test_demo_without_transformers_says_how_to_install_it(
    thawctl: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers absent (None in sys.modules makes its import fail), as without thaw[tiny].
    for name in list(sys.modules):
        if name == "transformers" or name.startswith("transformers."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = thawctl("demo", "--device", "cpu")
    assert result.code == exitcodes.ERROR
    line = one_error_line(result.err)
    assert "`thawctl demo` needs the Python package transformers" in line
    assert "pip install 'thaw[tiny]'" in line
    assert "report" not in line


def test_demo_json(thawctl: Any) -> None:
    result = thawctl("demo", "--json", "--device", "cpu")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["identical"] is True
    assert doc["device"] == "cpu"
    assert doc["original_tokens"] == doc["restored_tokens"]
    assert doc["before_restore_tokens"] != doc["original_tokens"]
    for key in ("freeze", "restore"):
        assert {"bytes", "seconds", "gbps", "source"} <= doc[key].keys()


def test_bench_without_daemon_skips_the_pinned_tier(thawctl: Any, snapshot_dir: Any) -> None:
    result = thawctl(
        "--socket",
        NO_DAEMON,
        "bench",
        "--size",
        "4MiB",
        "--repeat",
        "1",
        "--dir",
        str(snapshot_dir),
        "--json",
    )
    assert result.code == 0, result.err
    doc = result.json()
    tiers = {r["tier"]: r for r in doc["results"]}
    assert "file-warm" in tiers
    assert tiers["file-warm"]["bytes"] == 4 << 20
    assert tiers["file-warm"]["best_gbps"] > 0
    skipped = {s["tier"]: s["reason"] for s in doc["skipped"]}
    assert "no thawd" in skipped["daemon-pinned"]
    assert doc["snapshot"]["synthetic"] is True
    assert set(tiers) | set(skipped) == {"file-cold", "file-warm", "daemon-pinned"}


# --- progress -----------------------------------------------------------------------------------


def test_progress_plain_lines_when_not_a_tty() -> None:
    out = io.StringIO()
    bar = Progress("pinning x", out, tty=False, interval=0.0)
    bar.update(1 << 30, 4 << 30, elapsed=0.5)
    bar.update(2 << 30, 4 << 30, elapsed=1.0)
    bar.finish(4 << 30, 4 << 30, elapsed=2.0)
    lines = out.getvalue().splitlines()
    assert lines[0] == "pinning x: 1.0 GiB of 4.0 GiB (25.0%), 2.15 GB/s, 0.5s"
    assert lines[-1] == "pinning x: 4.0 GiB of 4.0 GiB (100.0%), 2.15 GB/s, 2.0s"
    assert "\r" not in out.getvalue()


def test_progress_bar_on_a_tty_redraws_one_line() -> None:
    out = io.StringIO()
    bar = Progress("pinning x", out, tty=True)
    bar.update(1 << 30, 4 << 30, elapsed=0.5)
    bar.finish(4 << 30, 4 << 30, elapsed=1.0)
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    assert "4.0 GiB/4.0 GiB" in text and "4.29 GB/s" in text


def test_progress_quiet_for_short_transfers_and_json() -> None:
    out = io.StringIO()
    Progress("x", out, tty=False).finish(1, 1, elapsed=0.01)  # nothing before: no line
    Progress("x", out, tty=True, enabled=False).finish(1, 1)
    assert out.getvalue() == ""


def test_json_output_is_one_document(thawctl: Any, snapshot_file: Any) -> None:
    result = thawctl("info", str(snapshot_file), "--json")
    json.loads(result.out)  # no progress or chatter mixed in


# --- layering -----------------------------------------------------------------------------------


def test_thawctl_never_imports_the_daemon() -> None:
    """The CLI and the dashboard use thaw.client's records only (STYLE.md 1, 2)."""
    code = (
        "import sys, thawctl.cli, thawctl.snapshots, thawctl.status, thawctl.bench, "
        "thawctl.freeze, thawctl.tui.app, thawctl.tui.source\n"
        "bad = sorted(m for m in sys.modules if m == 'thawd' or m.startswith('thawd.'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [__import__("sys").executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert done.returncode == 0, done.stderr


def test_help_does_not_import_torch() -> None:
    """`thawctl --help` and completion stay instant: no torch, grpc or textual at import."""
    code = (
        "import sys\nfrom thawctl.cli import build_parser\nbuild_parser()\n"
        "heavy = [m for m in ('torch', 'grpc', 'textual', 'thaw') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [__import__("sys").executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert done.returncode == 0, done.stderr
