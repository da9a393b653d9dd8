"""`voxscale demo`: what `make demo` runs.

Today it shows the foundation every later part stands on: a real control plane with fake GPU nodes,
and GPU pods that take a model-loading cold start before they turn Ready. It starts its own cluster
and stops everything it started at the end or on Ctrl-C.
"""

from __future__ import annotations

import json
import sys
import time

from voxscale.localcluster.cluster import LocalCluster

DEMO_CLUSTER = "demo"
COLD_START = "8s"

_DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "tts-demo", "namespace": "default"},
    "spec": {
        "replicas": 0,
        "selector": {"matchLabels": {"app": "tts-demo"}},
        "template": {
            "metadata": {"labels": {"app": "tts-demo"}, "annotations": {"voxscale.io/cold-start": COLD_START}},
            "spec": {
                "containers": [
                    {
                        "name": "tts",
                        "image": "voxscale/inference:demo",
                        "resources": {"limits": {"nvidia.com/gpu": "1"}},
                    }
                ]
            },
        },
    },
}


def _pod_table(cluster: LocalCluster) -> tuple[int, int, list[str]]:
    pods = json.loads(cluster.kubectl("get", "pods", "-l", "app=tts-demo", "-o", "json").stdout)["items"]
    rows, ready = [], 0
    for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
        conds = {c["type"]: c["status"] for c in p.get("status", {}).get("conditions", [])}
        is_ready = conds.get("Ready") == "True"
        ready += is_ready
        phase = p.get("status", {}).get("phase", "Pending")
        state = "Ready" if is_ready else ("loading model" if phase == "Running" else phase)
        rows.append(f"    {p['metadata']['name']:<34} {p['spec'].get('nodeName', '-'):<12} {state}")
    return len(pods), ready, rows


def run(replicas: int = 3) -> int:
    cluster = LocalCluster(DEMO_CLUSTER)
    started_here = not cluster.is_up()
    try:
        cluster.up(gpu_nodes=4)
        print("\n== fake GPU nodes (kwok), as the real kube-apiserver sees them")
        print(
            cluster.kubectl(
                "get",
                "nodes",
                "-o",
                "custom-columns=NODE:.metadata.name,GPU:.metadata.labels.nvidia\\.com/gpu\\.product,"
                "GPUS:.status.capacity.nvidia\\.com/gpu,READY:.status.conditions[?(@.type=='Ready')].status",
            ).stdout.rstrip()
        )
        print(f"\n== a GPU Deployment scaled 0 -> {replicas}; each pod models a {COLD_START} model-loading cold start")
        cluster.kubectl("apply", "-f", "-", input=json.dumps(_DEPLOYMENT))
        cluster.kubectl("scale", "deployment/tts-demo", f"--replicas={replicas}")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            total, ready, rows = _pod_table(cluster)
            print(f"  t={time.monotonic() - t0:4.1f}s  pods {total}/{replicas}  ready {ready}/{replicas}")
            if total == replicas and ready == replicas:
                print("\n".join(rows))
                break
            time.sleep(1.5)
        else:
            print("pods did not all turn Ready within 90 s", file=sys.stderr)
            return 1
        print(f"\nAll {replicas} GPU pods Ready after {time.monotonic() - t0:.1f}s.")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if started_here:
            cluster.down()
