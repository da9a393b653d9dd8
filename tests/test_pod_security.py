"""What we ship to a cluster, checked for pod security: checkov over the chart's render and the operator's
children (every accepted finding named with its reason in hack/checkov-skips.yaml), then the fields behind
the fixes one by one: no ServiceAccount token in the inference pods, a read-only root with emptyDirs where
the server writes, memory requested and limited from the spec, and the optional NetworkPolicies."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from voxscale.localcluster.harness import CHART, REPO, helm
from voxscale.operator import children, crd

SKIPS_FILE = REPO / "hack" / "checkov-skips.yaml"
# checkov lives in a virtualenv of its own (`make tools`, pinned in hack/tools-requirements.txt): its
# pins conflict with the project's (it would downgrade networkx, packaging and python-dateutil).
CHECKOV = Path(os.environ.get("VOXSCALE_CHECKOV", REPO / ".venv-tools" / "bin" / "checkov"))
NAMESPACE = "tts"  # not `default`: where a TTSDeployment lives is its author's choice, not ours
DOOR = {"enabled": True, "image": "ghcr.io/voxscale/operator:0.1.0", "serverPort": 5000, "healthPath": "/voices"}
ALL_MONITORING = [
    f"--set=monitoring.{m}.enabled=true" for m in ("serviceMonitor", "podMonitor", "prometheusRule", "grafanaDashboard")
]


def ttsd(path: Path | None = None, namespace: str = NAMESPACE, name: str = "", **spec: Any) -> dict[str, Any]:
    """A TTSDeployment as the API server stores it: the file (examples/minimal.yaml unless named), the
    CRD's defaults filled in, a namespace and a uid."""
    obj: dict[str, Any] = yaml.safe_load((path or REPO / "examples" / "minimal.yaml").read_text())
    obj["spec"].update(copy.deepcopy(spec))
    obj = crd.apply_defaults(obj)
    obj["metadata"].update(
        namespace=namespace, name=name or obj["metadata"]["name"], uid="0c5e3f1a-0000-4000-8000-000000000001"
    )
    return obj


def owned(obj: dict[str, Any]) -> list[dict[str, Any]]:
    found = [children.deployment(obj), children.service(obj)]
    found += [c for c in (children.pod_disruption_budget(obj), children.network_policy(obj)) if c]
    return found


def pod(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = children.deployment(obj)["spec"]["template"]["spec"]
    return spec


def render_chart(*args: str, release: str = "vx") -> list[dict[str, Any]]:
    out = helm("template", release, str(CHART), "-n", f"{release}-system", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def manifests() -> dict[str, list[dict[str, Any]]]:
    """The five sets hack/checkov-skips.yaml names in `where`, with their own names and namespaces: checkov's
    graph checks match a NetworkPolicy to pods by labels across files, and one set's policy must not cover
    another's pods."""
    examples = sorted((REPO / "examples").glob("*.yaml"))
    return {
        "operator": render_chart(*ALL_MONITORING),
        "operator-netpol": render_chart(*ALL_MONITORING, "--set=networkPolicy.enabled=true", release="vxnp"),
        "inference": [doc for path in examples for doc in owned(ttsd(path))],
        "inference-netpol": owned(ttsd(namespace="tts-netpol", name="netpol-tts", networkPolicy={"enabled": True})),
        # spec.proxy: a server of the user's own behind the door sidecar the operator injects.
        "inference-door": owned(
            ttsd(namespace="tts-door", name="door-tts", proxy=DOOR, networkPolicy={"enabled": True})
        ),
    }


def skips() -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = yaml.safe_load(SKIPS_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], list[str]]:
    """(manifest set, check id) -> the resources failing it, from one checkov run over all five sets."""
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: install the dev extra (pip install -e '.[dev]', as `make test` does)")
    where = tmp_path_factory.mktemp("checkov")
    for name, docs in manifests().items():
        (where / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    # --skip-download and BC_SKIP_MAPPING: no calls to Prisma Cloud for guidelines (offline, and quiet).
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "ERROR"}
    cmd = [str(CHECKOV), "-d", str(where), "--framework", "kubernetes", "-o", "json", "--quiet", "--skip-download"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    # Exit code 1 means "some check failed", which the tests below judge; anything else is checkov failing.
    assert res.returncode in (0, 1) and res.stdout.strip().startswith(("{", "[")), res.stderr[-3000:]
    reports = json.loads(res.stdout)
    found: dict[tuple[str, str], list[str]] = {}
    for report in reports if isinstance(reports, list) else [reports]:
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        for check in report["results"]["failed_checks"]:
            key = (Path(check["file_path"]).stem, check["check_id"])
            found.setdefault(key, []).append(f"{check['resource']}: {check['check_name']}")
    return found


def test_checkov_finds_nothing_we_have_not_accepted(findings: dict[tuple[str, str], list[str]]) -> None:
    accepted = {(where, check) for check, entry in skips().items() for where in entry["where"]}
    new = {key: findings[key] for key in sorted(set(findings) - accepted)}
    assert not new, (
        "checkov fails these checks; fix the manifest (operator/children.py, charts/voxscale/templates) or, "
        f"if the finding is right for us, add it with its reason to {SKIPS_FILE.relative_to(REPO)}:\n"
        + "\n".join(f"  {where} {check}: {resources}" for (where, check), resources in new.items())
    )


def test_every_accepted_exception_still_applies(findings: dict[tuple[str, str], list[str]]) -> None:
    stale = [(check, where) for check, e in skips().items() for where in e["where"] if (where, check) not in findings]
    assert not stale, f"these no longer fail: remove them from {SKIPS_FILE.relative_to(REPO)}: {stale}"


def test_every_accepted_exception_names_its_check_and_reason() -> None:
    sets = set(manifests())
    for check, entry in skips().items():
        assert re.fullmatch(r"CKV2?_K8S_\d+", check), check
        assert set(entry) == {"check", "where", "why"}, (check, sorted(entry))
        assert entry["where"] and set(entry["where"]) <= sets, (check, entry["where"])
        assert len(entry["why"].split()) >= 15, f"{check}: say why the finding is accepted"


# ---------------------------------------------------------------------------------- the inference pod
def test_inference_pods_mount_no_service_account_token() -> None:
    assert pod(ttsd())["automountServiceAccountToken"] is False


def test_inference_root_filesystem_is_read_only_with_emptydirs_where_the_server_writes() -> None:
    spec = pod(ttsd())
    container = spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    # /tmp (spooled uploads, torch scratch), the user's HOME (~/.cache, CUDA's ~/.nv, ~/.triton) and,
    # with no claim named, the voice store: each the pod's own disk-backed emptyDir with a size limit.
    home = re.search(r"useradd .*--uid (\d+) --create-home (\S+)", (REPO / "Dockerfile.inference").read_text())
    assert home, "Dockerfile.inference no longer creates the server's user the way children.py assumes"
    assert int(home.group(1)) == children.SERVER_UID == spec["securityContext"]["runAsUser"]
    for path in ("/tmp", f"/home/{home.group(2)}", children.VOICE_STORE_PATH):
        empty_dir = volumes[mounts[path]]["emptyDir"]
        assert empty_dir.get("sizeLimit") and "medium" not in empty_dir, (path, empty_dir)
    assert len(mounts) == len(volumes) == 3
    claimed = pod(ttsd(model={"image": "x", "voiceStore": {"claimName": "voices"}}))["volumes"]
    assert claimed[0] == {"name": "voices", "persistentVolumeClaim": {"claimName": "voices"}}
    assert [v["name"] for v in claimed[1:]] == ["tmp", "home"]


def memory(obj: dict[str, Any]) -> tuple[str, str]:
    resources = pod(obj)["containers"][0]["resources"]
    return resources["requests"]["memory"], resources["limits"]["memory"]


def test_memory_is_requested_and_limited_from_the_spec_with_the_crds_default() -> None:
    field = crd.schema()["properties"]["spec"]["properties"]["resources"]["properties"]["memory"]
    default = field["default"]
    assert field["description"] and children.quantity(default, "default") >= 2**30
    assert memory(ttsd()) == (default, default)
    # The default fills in even where the object was never defaulted (a file read by the simulator).
    raw = yaml.safe_load((REPO / "examples" / "minimal.yaml").read_text())
    raw["metadata"].update(namespace=NAMESPACE, uid="u")
    assert memory(raw) == (default, default)
    assert memory(ttsd(resources={"memory": "12Gi"})) == ("12Gi", "12Gi")
    # requests/limits.memory win for their side; the limit is never below the request.
    assert memory(ttsd(resources={"requests": {"memory": "512Mi"}})) == ("512Mi", default)
    assert memory(ttsd(resources={"requests": {"memory": "64Gi"}})) == ("64Gi", "64Gi")
    assert memory(ttsd(resources={"requests": {"memory": "6Gi"}, "limits": {"memory": "16Gi"}})) == ("6Gi", "16Gi")
    gpu = pod(ttsd())["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpu == "1"


def test_cpu_is_requested_from_the_spec_with_the_crds_default_and_not_limited() -> None:
    field = crd.schema()["properties"]["spec"]["properties"]["resources"]["properties"]["cpu"]
    assert field["description"]

    def cpu(obj: dict[str, Any]) -> tuple[str, str | None]:
        resources = pod(obj)["containers"][0]["resources"]
        return resources["requests"]["cpu"], resources["limits"].get("cpu")

    assert cpu(ttsd()) == (field["default"], None)  # no limit: see CKV_K8S_11 in hack/checkov-skips.yaml
    assert cpu(ttsd(resources={"cpu": "500m"})) == ("500m", None)
    assert cpu(ttsd(resources={"requests": {"cpu": 2}, "limits": {"cpu": 4}})) == ("2", "4")


def test_a_memory_quantity_is_read_or_refused_naming_the_field() -> None:
    assert children.quantity("8Gi", "f") == 8 * 2**30
    assert children.quantity("1.5G", "f") == 1.5e9
    assert children.quantity(1000, "f") == 1000
    with pytest.raises(ValueError, match=r"spec\.resources\.memory: '8 GB' is not a quantity; write e\.g\. 8Gi"):
        children.quantity("8 GB", "spec.resources.memory")


def test_network_policy_is_off_by_default_and_admits_only_the_serving_port() -> None:
    field = crd.schema()["properties"]["spec"]["properties"]["networkPolicy"]
    assert field["properties"]["enabled"]["default"] is False and field["properties"]["enabled"]["description"]
    assert children.network_policy(ttsd()) is None
    assert "NetworkPolicy" not in children.expected_kinds(ttsd())
    obj = ttsd(networkPolicy={"enabled": True}, service={"port": 9000})
    policy = children.network_policy(obj)
    assert policy is not None and "NetworkPolicy" in children.expected_kinds(obj)
    assert policy["metadata"]["ownerReferences"][0]["name"] == "minimal-tts"
    assert policy["spec"]["podSelector"] == {"matchLabels": children.selector_labels("minimal-tts")}
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9000}]}]
    assert policy["spec"]["egress"] == []  # the server calls out to nothing
