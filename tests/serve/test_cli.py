"""`thawctl serve`'s refusals before any engine starts (no vLLM engine: seconds), against a
real thawd: each is one line on stderr and its exit code, never a traceback."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from thawctl import exitcodes
from thawctl.cli import main
from thawctl.serve.command import engine_args


def serve(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, err.getvalue()


def test_engine_args_are_json_else_strings() -> None:
    assert engine_args(["max_model_len=4096", "enforce-eager=true", "dtype=float16"]) == {
        "load_format": "dummy",  # every slot's weights come from thawd
        "max_model_len": 4096,
        "enforce_eager": True,
        "dtype": "float16",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        engine_args(["nonsense"])


def test_a_snapshot_thawd_does_not_hold_is_refused_before_engines_start(
    module_thawd: Any,
) -> None:
    code, err = serve("--socket", module_thawd.socket, "serve", "--model", "/nonexistent",
                      "--snapshot", "no-such-snapshot")  # fmt: skip
    assert code == exitcodes.NOT_FOUND, err
    assert err.startswith("thawctl: error: snapshot 'no-such-snapshot'") and err.count("\n") == 1
    assert "starting engine" not in err


def test_a_token_file_others_can_read_is_refused(module_thawd: Any, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("x" * 32)
    token.chmod(0o644)
    code, err = serve("--socket", module_thawd.socket, "serve", "--model", "/nonexistent",
                      "--snapshot", "tiny0", "--admin-token-file", str(token))  # fmt: skip
    assert code == exitcodes.PERMISSION_DENIED, err
    assert f"chmod 600 {token}" in err


def test_bad_arguments_are_usage_errors(module_thawd: Any) -> None:
    for extra in (["--register", "no-equals-sign"], ["--engine-arg", "x"],
                  ["--pool-size", "0"], ["--name", "has space"]):  # fmt: skip
        code, err = serve("--socket", module_thawd.socket, "serve", "--model", "/nonexistent",
                          "--snapshot", "no-such-snapshot", *extra)  # fmt: skip
        assert code == exitcodes.USAGE, (extra, err)
        assert err.count("\n") == 1 and "unexpected" not in err, err
