"""Pure checks of the project's shape: import names, version pins, wrapper-module generation."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from voxscale.cli import build_parser
from voxscale.localcluster import binaries
from voxscale.localcluster.cluster import gpu_node_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags", [[], ["-S"]])
def test_repo_root_never_shadows_the_standard_operator_module(flags: list[str]) -> None:
    # `operator/` holds voxscale.operator; from the repo root `import operator` must still be the stdlib's.
    out = subprocess.run(
        [sys.executable, *flags, "-c", "import operator; print(operator.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(out).parent == Path(sysconfig.get_paths()["stdlib"])


def test_folders_map_to_voxscale_subpackages() -> None:
    import voxscale.inference
    import voxscale.operator

    assert "operator" in str(next(iter(voxscale.operator.__path__)))
    assert "inference" in str(next(iter(voxscale.inference.__path__)))


def test_every_component_is_pinned_in_the_one_versions_file() -> None:
    pins = binaries.pinned_versions()
    assert set(pins) == {
        "kubernetes",
        "etcd",
        "kwok",
        "helm",
        "prometheus",
        "pause",
        "prometheus-operator",
        "registry",
        "metrics-server",
    }
    comps = binaries.components(pins)
    assert {c.version for c in comps.values()} == set(pins.values())
    assert pins["etcd"].startswith(("v3.5.", "v3.6."))


UPSTREAM_GO_MOD = """module k8s.io/kubernetes

go 1.25.0

require (
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tgithub.com/some/fork => github.com/other/fork v1.2.3
)
"""


def test_kubernetes_wrapper_replaces_each_staging_module_with_its_published_version() -> None:
    go_mod = binaries.kubernetes_wrapper_go_mod("v1.35.4", UPSTREAM_GO_MOD)
    assert "require k8s.io/kubernetes v1.35.4" in go_mod
    assert "\tk8s.io/api => k8s.io/api v0.35.4" in go_mod
    assert "\tk8s.io/client-go => k8s.io/client-go v0.35.4" in go_mod
    assert "github.com/some/fork" not in go_mod  # only staging modules are rewritten
    assert "go 1.25.0" in go_mod


def test_kubernetes_binaries_are_version_stamped() -> None:
    pins = {"kubernetes": "v1.35.4", "etcd": "v3.6.1", "kwok": "v0.8.0", "helm": "v3.21.4"}
    on_demand = {"prometheus-operator": "v0.93.0", "registry": "v3.1.2", "metrics-server": "v0.8.0"}
    comp = binaries.components({**pins, "prometheus": "v0.316.0", "pause": "v1", **on_demand})
    flags = " ".join(comp["kubernetes"].ldflags)
    assert "-X k8s.io/component-base/version.gitVersion=v1.35.4" in flags
    assert "-X k8s.io/client-go/pkg/version.gitVersion=v1.35.4" in flags
    assert "version.version=v3.21.4" in " ".join(comp["helm"].ldflags)
    assert "consts.Version=0.8.0" in " ".join(comp["kwok"].ldflags)
    assert "version.Version=3.16.0" in " ".join(comp["prometheus"].ldflags)
    assert "-X k8s.io/component-base/version.gitVersion=v1.35.4" in " ".join(comp["kubernetes-node"].ldflags)


def test_binaries_are_cached_outside_the_repository() -> None:
    for comp in binaries.components().values():
        assert REPO not in comp.bin_dir.parents


def test_fake_gpu_node_carries_the_labels_gpu_feature_discovery_sets() -> None:
    node = gpu_node_manifest(0, gpus=4)
    labels = node["metadata"]["labels"]
    assert labels["nvidia.com/gpu.count"] == "4"
    assert labels["nvidia.com/gpu.present"] == "true"
    assert "nvidia.com/gpu.product" in labels


def test_cli_has_the_cluster_subcommands() -> None:
    parser = build_parser()
    for action in ("up", "down", "status", "env", "build"):
        args = parser.parse_args(["cluster", action])
        assert callable(args.handler)


def test_pods_fs_group_is_the_inference_images_user() -> None:
    """The operator's fsGroup must match the image's uid, or a claimed voice store is read-only to it."""
    from voxscale.operator.children import SERVER_UID

    dockerfile = (REPO / "Dockerfile.inference").read_text()
    assert f"--uid {SERVER_UID} " in dockerfile and f"USER {SERVER_UID}" in dockerfile


def test_the_inference_image_listens_where_the_operator_says() -> None:
    """The operator sets VOXSCALE_PORT from spec.service.port; a port pinned in the image's command
    line would win over it and give pods that never turn Ready on any other port."""
    from voxscale import settings_contract as sc

    dockerfile = (REPO / "Dockerfile.inference").read_text()
    entrypoint = next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT"))
    assert "--port" not in entrypoint
    assert f"ENV {sc.PORT.env}={sc.PORT.default}" in dockerfile
