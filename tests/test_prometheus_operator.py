"""The chart's ServiceMonitor, PodMonitor and PrometheusRule loaded by a real prometheus-operator, and
a real Prometheus scraping the operator and a server through what it generated (issue 22, item 13).

On a local cluster with a real node (real containers, pod addresses reachable from the host):
- prometheus-operator (built from its Go module, `binaries.py`) runs as a host process with the
  cluster's admin kubeconfig (kube-prometheus-stack gives it a ClusterRole; the permissions are not
  what is under test), with the CRDs its own module ships;
- the chart is installed as a cluster gets it (the operator image as a pod) with its monitoring
  objects on and kube-prometheus-stack's `release` label; one TTSDeployment runs voxscale's server and
  one runs Piper's behind the door sidecar (examples/servers/piper/owned.yaml);
- a Prometheus object selects monitors and rules by that label, as kube-prometheus-stack's does.

What prometheus-operator generated from the chart's objects is asserted as it wrote it: the
configuration Secret (a scrape job for the operator's Service and one for the inference pods, with
the chart's honorLabels and relabelings) and the rule ConfigMap (the chart's alerts).

prometheus-operator would run that configuration in a StatefulSet; its image cannot be pulled here, so
that pod is kept off every node and the cluster's own Prometheus build (3.x, Kubernetes discovery
compiled in) runs the generated configuration on the host instead, as the StatefulSet's
config-reloader sidecar would hand it over (`$(SHARD)` and `$(POD_NAME)` substituted,
`promoperator.substitute`). One change is made to it (`promoperator.outside_the_cluster`): outside a
pod there is no in-cluster service account, so each `kubernetes_sd_configs` entry gets the cluster's
kubeconfig (`kubeconfig_file`), and the rule files are read from a folder rather than the mounted
ConfigMap. Jobs, selectors and relabelings are the
operator's. That Prometheus finds the operator pod and both server pods through those jobs and
scrapes them (`up`; the door's pod on its metrics port only), and loads the chart's alerts.
"""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_chart import ALL_MONITORING, render
from tests.test_piper_e2e import EXAMPLES as PIPER_EXAMPLES
from tests.test_piper_e2e import manifests as piper_manifests
from voxscale.localcluster import binaries, promoperator, realnode, realpods
from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import CHART, OPERATOR_NAMESPACE, free_port, get_json, helm, wait_for
from voxscale.localcluster.procs import http_ok
from voxscale.operator import children

RELEASE = "voxscale"
RELEASE_LABEL = {"release": "kube-prometheus-stack"}  # what kube-prometheus-stack's Prometheus selects on
MONITORING_NAMESPACE = "monitoring"
PROMETHEUS = "k8s"
SERVER_NAMESPACE = "tts"
SERVER = "monitored"


# ------------------------------------------------------------------ the pure part: no cluster
def secret_of(config: dict[str, Any]) -> dict[str, Any]:
    data = base64.b64encode(gzip.compress(yaml.safe_dump(config).encode())).decode()
    return {"data": {promoperator.CONFIG_KEY: data}}


def test_the_build_wrapper_takes_prometheus_versioned_replaces_and_leaves_its_local_ones() -> None:
    """Replace lines bind only the main module: the wrapper must carry the ones Prometheus builds with
    (without cloud.google.com/go's, `go mod tidy` finds compute/metadata in two modules)."""
    go_mod = (
        "module m\n\nrequire (\n\tgithub.com/prometheus/prometheus v0.313.1\n)\n\n"
        "replace cloud.google.com/go => cloud.google.com/go v0.123.0\n\n"
        "replace (\n\ta/b => ./b\n\tx/y => z/y v1.2.3\n)\n"
    )
    assert binaries.versioned_replaces(go_mod) == [
        "cloud.google.com/go => cloud.google.com/go v0.123.0",
        "x/y => z/y v1.2.3",
    ]
    assert binaries.required_version(go_mod, "github.com/prometheus/prometheus") == "v0.313.1"
    with pytest.raises(KeyError):
        binaries.required_version(go_mod, "github.com/prometheus/common")


def test_the_generated_config_is_read_from_its_gzipped_secret() -> None:
    config = {"global": {"scrape_interval": "5s"}, "scrape_configs": [{"job_name": "a"}]}
    assert promoperator.decode_config(secret_of(config)) == config


def test_outside_the_cluster_only_adds_the_kubeconfig_and_moves_the_rule_files(tmp_path: Path) -> None:
    sd = {"role": "pod", "namespaces": {"names": ["x"]}}
    job = {"job_name": "podMonitor/x/y/0", "kubernetes_sd_configs": [sd], "relabel_configs": [{"action": "keep"}]}
    config = {
        "scrape_configs": [job, {"job_name": "static", "static_configs": [{"targets": ["a:1"]}]}],
        "rule_files": [f"{promoperator.RULES_DIR}/prometheus-k8s-rulefiles-0/*.yaml"],
    }
    out = promoperator.outside_the_cluster(config, tmp_path / "kubeconfig", tmp_path / "rules")
    assert out["scrape_configs"][0]["kubernetes_sd_configs"] == [
        {**sd, "kubeconfig_file": str(tmp_path / "kubeconfig")}
    ]
    assert out["scrape_configs"][0]["relabel_configs"] == job["relabel_configs"]
    assert out["scrape_configs"][1] == config["scrape_configs"][1]
    assert out["rule_files"] == [str(tmp_path / "rules" / "prometheus-k8s-rulefiles-0" / "*.yaml")]
    assert "kubeconfig_file" not in sd, "the input is left as it was"


def test_the_reloaders_variables_are_substituted_as_it_does_and_an_unknown_one_is_an_error() -> None:
    env = promoperator.reloader_env("k8s")
    assert env == {"SHARD": "0", "POD_NAME": "prometheus-k8s-0"}
    relabel = [{"replacement": "$(SHARD)"}, {"regex": "$(SHARD);|.+;.+"}, {"replacement": "${1}"}, {"modulus": 1}]
    config = {"global": {"external_labels": {"prometheus_replica": "$(POD_NAME)"}}, "relabel": relabel}
    assert promoperator.substitute(config, env) == {
        "global": {"external_labels": {"prometheus_replica": "prometheus-k8s-0"}},
        "relabel": [{"replacement": "0"}, {"regex": "0;|.+;.+"}, {"replacement": "${1}"}, {"modulus": 1}],
    }
    with pytest.raises(KeyError, match="NODE_NAME"):
        promoperator.substitute({"a": ["x $(NODE_NAME)"]}, env)


def test_a_config_that_already_names_an_api_server_is_refused(tmp_path: Path) -> None:
    job = {"job_name": "j", "kubernetes_sd_configs": [{"role": "pod", "api_server": "https://x"}]}
    with pytest.raises(ValueError, match="api_server"):
        promoperator.outside_the_cluster({"scrape_configs": [job]}, tmp_path / "k", tmp_path / "r")


def test_the_pod_monitor_names_the_container_and_ports_the_operator_gives_its_pods() -> None:
    """The chart cannot import the operator's names: they are held equal here. Without the door
    endpoint a team's own server behind the door (spec.proxy) was never scraped by the PodMonitor."""
    (pm,) = [d for d in render(*ALL_MONITORING) if d["kind"] == "PodMonitor"]
    own, door = pm["spec"]["podMetricsEndpoints"]
    assert own["port"] == children.PORT_NAME
    assert own["relabelings"][0] == {
        "sourceLabels": ["__meta_kubernetes_pod_container_name"],
        "regex": children.CONTAINER,
        "action": "keep",
    }
    assert door["port"] == children.DOOR_METRICS_PORT_NAME
    assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == children.MANAGED_BY


# ------------------------------------------------------------------ the real stack
@pytest.fixture(scope="module")
def prometheus_operator_binary() -> Path:
    """Built here, before any cluster is up, when the cache lacks it (on this machine, cold, with
    the Go build cache of the control plane's components: see the README); cached afterwards."""
    return promoperator.build()


@pytest.fixture(scope="module")
def monitored_cluster(operator_image: str, inference_image: str, piper_image: str) -> Iterator[LocalCluster]:
    cluster = LocalCluster("promop")
    st = cluster.up(gpu_nodes=1, real_node=True, timeout=300)
    try:
        cluster.load_images([operator_image, inference_image, piper_image])
        yield cluster
    finally:
        cluster.down(quiet=True)
        assert realnode.leftovers(st) == [], "cluster down left these behind"


def install_chart_with_monitoring(cluster: LocalCluster, operator_image: str) -> None:
    """The chart as the real-pod tests install it, then its monitoring objects switched on with the
    label kube-prometheus-stack selects on (an upgrade that changes nothing else)."""
    st = cluster.state
    assert st is not None
    realpods.install_operator(st, operator_image, release=RELEASE)
    labels = [arg for k, v in RELEASE_LABEL.items() for arg in ("--set", f"monitoring.labels.{k}={v}")]
    res = helm(
        "upgrade", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE, "--reuse-values",
        *ALL_MONITORING, *labels, "--wait", "--timeout", "120s",
        state=st, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


def monitoring_objects(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    """The chart's ServiceMonitor, PodMonitor and PrometheusRule as the API server holds them."""
    found = {}
    for kind in ("servicemonitors", "podmonitors", "prometheusrules"):
        (item,) = get_json(cluster, kind, "-n", OPERATOR_NAMESPACE)["items"]
        assert item["metadata"]["labels"].items() >= RELEASE_LABEL.items(), item["metadata"]
        found[item["kind"]] = item
    return found


def generated(cluster: LocalCluster) -> dict[str, Any]:
    secret = get_json(cluster, "secret", f"prometheus-{PROMETHEUS}", "-n", MONITORING_NAMESPACE)
    return promoperator.decode_config(secret)


def rule_configmaps(cluster: LocalCluster) -> list[dict[str, Any]]:
    items = get_json(cluster, "configmaps", "-n", MONITORING_NAMESPACE)["items"]
    return [cm for cm in items if cm["metadata"]["name"].startswith(f"prometheus-{PROMETHEUS}-rulefiles-")]


def api(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)["data"]


@pytest.mark.timeout(1800)  # a cold build of prometheus-operator is part of the first run's setup
def test_prometheus_operator_turns_the_charts_monitors_into_jobs_that_scrape_the_operator_and_a_server(
    prometheus_operator_binary: Path,
    monitored_cluster: LocalCluster,
    operator_image: str,
    inference_image: str,
    piper_image: str,
    tmp_path: Path,
) -> None:
    cluster = monitored_cluster
    st = cluster.state
    assert st is not None
    promoperator.apply_crds(cluster)
    install_chart_with_monitoring(cluster, operator_image)
    objects = monitoring_objects(cluster)

    cluster.kubectl("create", "namespace", SERVER_NAMESPACE)
    manifest = realpods.real_ttsd(SERVER, inference_image, min_replicas=1, max_replicas=1)
    cluster.kubectl("apply", "-n", SERVER_NAMESPACE, "-f", "-", input=json.dumps(manifest))
    # A team's own server behind the door: Piper's, as examples/servers/piper/owned.yaml runs it.
    images = {"REG/piper-http:1.8.0": piper_image, "REG/voxscale/operator:0.1.0": operator_image}
    (door_ttsd,) = piper_manifests(PIPER_EXAMPLES / "owned.yaml", images)
    door_ttsd["spec"]["replicas"] = {"min": 1, "max": 1}
    cluster.kubectl("apply", "-n", SERVER_NAMESPACE, "-f", "-", input=json.dumps(door_ttsd))

    cluster.kubectl("create", "namespace", MONITORING_NAMESPACE)
    version = f"v{binaries._prometheus_release(binaries.pinned_versions()['prometheus'])}"
    prom_cr = promoperator.prometheus_cr(PROMETHEUS, MONITORING_NAMESPACE, RELEASE_LABEL, version)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(prom_cr))
    operator_log = tmp_path / "prometheus-operator.log"
    operator = promoperator.PrometheusOperatorProcess(prometheus_operator_binary, st.kubeconfig, operator_log).start()
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        # What prometheus-operator generated from the chart's objects.
        sm, pm = objects["ServiceMonitor"]["metadata"]["name"], objects["PodMonitor"]["metadata"]["name"]
        sm_job, pm_job = f"serviceMonitor/{OPERATOR_NAMESPACE}/{sm}/0", f"podMonitor/{OPERATOR_NAMESPACE}/{pm}/0"
        door_job = f"podMonitor/{OPERATOR_NAMESPACE}/{pm}/1"

        def both_jobs() -> dict[str, Any] | None:
            assert operator.alive(), operator.log()[-3000:]
            config = generated(cluster)
            names = {job["job_name"] for job in config.get("scrape_configs", [])}
            return config if {sm_job, pm_job, door_job} <= names else None

        config = wait_for("prometheus-operator to generate the scrape jobs", both_jobs, timeout=120, interval=1)
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        assert jobs[sm_job]["honor_labels"] is True  # the operator's per-object `namespace` label is kept
        assert jobs[sm_job]["kubernetes_sd_configs"][0]["namespaces"]["names"] == [OPERATOR_NAMESPACE]
        assert jobs[pm_job]["kubernetes_sd_configs"][0]["role"] == "pod"
        assert "namespaces" not in jobs[pm_job]["kubernetes_sd_configs"][0], "namespaceSelector any: every namespace"
        targets = {r.get("target_label") for r in jobs[pm_job]["relabel_configs"]}
        assert {"pod", "namespace"} <= targets

        configmaps = wait_for("the rule ConfigMap", lambda: rule_configmaps(cluster), timeout=60, interval=1)
        groups = [g for cm in configmaps for text in cm["data"].values() for g in yaml.safe_load(text)["groups"]]
        alerts = {r["alert"] for g in groups for r in g["rules"]}
        chart_alerts = {r["alert"] for g in objects["PrometheusRule"]["spec"]["groups"] for r in g["rules"]}
        assert alerts == chart_alerts and alerts

        # A real Prometheus runs that configuration and scrapes through its jobs.
        rules_dir = tmp_path / "rules"
        promoperator.write_rule_files(configmaps, rules_dir)
        as_reloaded = promoperator.substitute(config, promoperator.reloader_env(PROMETHEUS))
        outside = promoperator.outside_the_cluster(as_reloaded, st.kubeconfig, rules_dir)
        (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(outside))
        url = f"http://127.0.0.1:{free_port()}"
        with (tmp_path / "prometheus.log").open("wb") as log:
            prometheus = subprocess.Popen(
                [
                    str(binaries.binary("prometheus")),
                    f"--config.file={tmp_path / 'prometheus.yaml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address={url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for("the Prometheus to be ready", lambda: http_ok(f"{url}/-/ready"), timeout=60, interval=0.5)

        realpods.wait_ready(cluster, SERVER_NAMESPACE, SERVER, 1, timeout=300)
        operator_pod = realpods.operator_pod(cluster, RELEASE)["metadata"]["name"]
        (server_pod,) = [p["metadata"]["name"] for p in realpods.ready_pods(cluster, SERVER_NAMESPACE, SERVER)]

        def up_in(job: str, pod: str) -> dict[str, Any] | None:
            active = api(f"{url}/api/v1/targets?state=active")["activeTargets"]
            hits = [t for t in active if t["scrapePool"] == job and t["labels"].get("pod") == pod]
            return hits[0] if hits and hits[0]["health"] == "up" else None

        op_target = wait_for(f"{sm_job} to scrape {operator_pod}", lambda: up_in(sm_job, operator_pod), 120, 1)
        server_target = wait_for(f"{pm_job} to scrape {server_pod}", lambda: up_in(pm_job, server_pod), 120, 1)
        print(f"up: {op_target['scrapeUrl']} ({sm_job}), {server_target['scrapeUrl']} ({pm_job})")
        assert server_target["labels"]["namespace"] == SERVER_NAMESPACE

        door_name = door_ttsd["metadata"]["name"]
        realpods.wait_ready(cluster, SERVER_NAMESPACE, door_name, 1, timeout=300)
        (door_pod,) = [p["metadata"]["name"] for p in realpods.ready_pods(cluster, SERVER_NAMESPACE, door_name)]
        door_target = wait_for(f"{door_job} to scrape {door_pod}", lambda: up_in(door_job, door_pod), 120, 1)
        print(f"up: {door_target['scrapeUrl']} ({door_job})")
        pools = {
            t["scrapePool"]
            for t in api(f"{url}/api/v1/targets?state=active")["activeTargets"]
            if t["labels"].get("pod") == door_pod
        }
        assert pools == {door_job}, "the door's serving port (it forwards /metrics to Piper) is not scraped"

        loaded = api(f"{url}/api/v1/rules?type=alert")["groups"]
        assert {r["name"] for g in loaded for r in g["rules"] if r["health"] != "err"} == chart_alerts
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        operator.stop()
