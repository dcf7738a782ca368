"""deploy/kubernetes: valid Kubernetes objects (kubernetes-validate's vendored schemas, strict:
no unknown fields; no network), and consistent with thawd: its config parses, the probes ask
for thawd's health service on the port it listens on, the socket directory is the one in
its config."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from thawd import config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
VERSION = "1.37.0"

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")


def documents() -> dict[str, Any]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


@pytest.mark.parametrize("kind", ["ConfigMap", "DaemonSet", "Deployment"])
def test_manifests_are_valid_kubernetes_objects(kind: str) -> None:
    kubernetes_validate.validate(documents()[kind], VERSION, strict=True)


def test_the_validator_refuses_a_broken_manifest() -> None:
    broken = copy.deepcopy(documents()["DaemonSet"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)
    broken = copy.deepcopy(documents()["DaemonSet"])
    broken["spec"]["template"]["spec"]["containers"][0]["memlock"] = True  # no such field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_the_daemonset_runs_thawd_as_its_configmap_configures_it(tmp_path: Path) -> None:
    docs = documents()
    toml = tmp_path / "thawd.toml"
    toml.write_text(docs["ConfigMap"]["data"]["thawd.toml"])
    thawd = config.load(toml)
    assert thawd.s3.enabled and thawd.s3.cache_dir
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = int(thawd.tcp_listen.rsplit(":", 1)[1])
    assert container["readinessProbe"]["grpc"] == {"port": port, "service": "thaw.v1.Thawd"}
    assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for directory in (str(Path(thawd.socket).parent), thawd.state_dir, thawd.s3.cache_dir):
        assert volumes[mounts[directory]]["hostPath"]["path"] == directory
    config_map = docs["ConfigMap"]["metadata"]["name"]
    assert volumes[mounts["/etc/thawd"]]["configMap"]["name"] == config_map
    # The example engine reaches the same socket, in the socket group thawd runs with.
    engine = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsGroup"] in engine["securityContext"]["supplementalGroups"]
    for c in [*engine["initContainers"], *engine["containers"]]:
        assert {"name": "THAW_SOCKET", "value": thawd.socket} in c["env"]
    (socket_dir,) = [v for v in engine["volumes"] if "hostPath" in v]
    assert socket_dir["hostPath"]["path"] == str(Path(thawd.socket).parent)
