"""The [s3] table and object URIs, without a store: what thawd accepts from its operator and
from its clients."""

from __future__ import annotations

from pathlib import Path

import pytest

from thaw.engines.options import Options
from thaw.engines.ranks import rank_path, resolve
from thaw.errors import InvalidRequest, PermissionDenied
from thawd import config
from thawd.s3.config import ObjectRef, S3Config


def load(tmp_path: Path, table: str) -> config.Config:
    path = tmp_path / "thawd.toml"
    path.write_text(f"[s3]\n{table}\n")
    return config.load(path)


def test_object_storage_is_off_unless_the_operator_allows_prefixes(tmp_path: Path) -> None:
    assert not config.load(None).s3.enabled
    table = (
        'allow = ["s3://models/snapshots/"]\ncache_dir = "/var/cache/thawd"\n'
        'cache_bytes = "200GiB"\nendpoint_url = "http://127.0.0.1:9000"'
    )
    s3 = load(tmp_path, table).s3
    assert s3.enabled and s3.cache_bytes == 200 << 30
    s3.check(ObjectRef.parse("s3://models/snapshots/llama.thaw"), "read")
    for uri in ("s3://models/other/llama.thaw", "s3://models/snapshots-private/x.thaw",
                "s3://other/snapshots/llama.thaw"):  # fmt: skip
        with pytest.raises(PermissionDenied, match="allow list"):
            s3.check(ObjectRef.parse(uri), "read")
    with pytest.raises(PermissionDenied, match="allow_write list admits nothing"):
        s3.check(ObjectRef.parse("s3://models/snapshots/llama.thaw"), "write")
    with pytest.raises(PermissionDenied, match="off"):
        S3Config().check(ObjectRef.parse("s3://models/snapshots/llama.thaw"), "read")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('allow = ["s3://models/snapshots"]', 'ending in "/"'),  # would admit snapshots-x/
        ('allow_write = ["s3://models/"]', "needs allow"),
        ('allow = "s3://models/"', "write a list"),
        ('allow = ["/models/"]', "write a list"),
        ('allow = ["s3://models/"]\ncache_dir = "/c"', "needs cache_bytes"),
        ('allow = ["s3://models/"]\npart_size = "1MiB"', "5MiB"),
        ('allow = ["s3://models/"]\nendpoint = "x"', "unknown key endpoint"),
        ('allow = ["s3://models/"]\nconnections = 0', "1 to 64"),
        ('allow = ["s3://models/"]\nendpoint_url = "ftp://x"', "endpoint_url"),
    ],
)
def test_a_bad_s3_table_is_refused_naming_the_key(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        load(tmp_path, table)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://",
        "s3://b",
        "s3://models/",
        "s3://models/a/../b.thaw",
        "s3://models/./b.thaw",
        "s3://Models/x.thaw",
        "s3://models/x\n.thaw",
        "http://models/x.thaw",
    ],
)
def test_uris_that_name_no_single_object_are_refused(uri: str) -> None:
    with pytest.raises(InvalidRequest):
        ObjectRef.parse(uri)


def test_ranks_of_an_object_are_named_as_files_are() -> None:
    assert rank_path("s3://models/llama.thaw", 1, 2) == "s3://models/llama.rank1.thaw"
    assert rank_path("s3://models/{rank}/llama.thaw", 3, 4) == "s3://models/3/llama.thaw"
    assert rank_path("s3://models/llama.thaw", 0, 1) == "s3://models/llama.thaw"
    ref = resolve(Options(snapshot="s3://models/llama.thaw"), 1, 2)
    assert ref.path == "s3://models/llama.rank1.thaw"
