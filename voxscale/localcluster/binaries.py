"""Build the local control plane's binaries from Go modules, once, into a cache outside the repo.

Nothing is downloaded but Go modules: each component is built from a tiny wrapper module generated
here, so upstream `replace` lines that point into a monorepo (etcd's `../api`, Kubernetes'
`./staging/...`) are replaced by the published modules instead. Builds land in a temporary folder
and are renamed into place when complete, so an interrupted build is never mistaken for a cached one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

VERSIONS_FILE = Path(__file__).with_name("versions.toml")


def cache_root() -> Path:
    """Where built binaries and wrapper modules live (never inside the repository)."""
    env = os.environ.get("VOXSCALE_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "voxscale"
    return base


def pinned_versions() -> dict[str, str]:
    """Component name -> pinned version, read from versions.toml (the single source of truth)."""
    with VERSIONS_FILE.open("rb") as fh:
        data = tomllib.load(fh)
    return {name: str(table["version"]) for name, table in data.items()}


@dataclass(frozen=True)
class GoComponent:
    """One thing to build: a wrapper module, the packages to compile in it, and the version stamps."""

    name: str
    version: str
    binaries: tuple[str, ...]
    packages: tuple[str, ...]
    ldflags: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # Go build tags
    # Returns the wrapper module's files (path -> content); may consult the module cache.
    files: Callable[[GoComponent], dict[str, str]] = field(default=lambda c: {}, compare=False)

    @property
    def bin_dir(self) -> Path:
        return cache_root() / "bin" / f"{self.name}-{self.version}"

    def path(self, binary: str) -> Path:
        return self.bin_dir / binary

    def is_built(self) -> bool:
        return all(os.access(self.path(b), os.X_OK) for b in self.binaries)


def _tools_go(packages: tuple[str, ...]) -> str:
    """A build-tagged file that makes `go mod tidy` record the requirements of main packages."""
    imports = "\n".join(f'\t_ "{p}"' for p in packages)
    return f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n"


def _go_mod_download(module_at_version: str) -> dict[str, str]:
    out = subprocess.run(
        ["go", "mod", "download", "-json", module_at_version],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info: dict[str, str] = json.loads(out)
    return info


_STAGING_REPLACE = re.compile(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", re.MULTILINE)


def kubernetes_staging_modules(upstream_go_mod: str) -> list[str]:
    """The staging modules a k8s.io/kubernetes go.mod replaces with relative paths."""
    return sorted(set(_STAGING_REPLACE.findall(upstream_go_mod)))


def kubernetes_wrapper_go_mod(version: str, upstream_go_mod: str) -> str:
    """go.mod requiring k8s.io/kubernetes, each staging module replaced by its published v0.X.Y."""
    staging_version = "v0" + version[version.index(".") :]  # v1.35.4 -> v0.35.4
    replaces = "\n".join(f"\t{m} => {m} {staging_version}" for m in kubernetes_staging_modules(upstream_go_mod))
    go_line = re.search(r"^go\s+(\S+)", upstream_go_mod, re.MULTILINE)
    return (
        "module voxscale.local/kubernetes\n\n"
        f"go {go_line.group(1) if go_line else '1.25'}\n\n"
        f"require k8s.io/kubernetes {version}\n\n"
        f"replace (\n{replaces}\n)\n"
    )


def _kubernetes_files(c: GoComponent) -> dict[str, str]:
    info = _go_mod_download(f"k8s.io/kubernetes@{c.version}")
    upstream = Path(info["GoMod"]).read_text()
    return {"go.mod": kubernetes_wrapper_go_mod(c.version, upstream), "tools.go": _tools_go(c.packages)}


def _require_files(module: str) -> Callable[[GoComponent], dict[str, str]]:
    def files(c: GoComponent) -> dict[str, str]:
        return {
            "go.mod": f"module voxscale.local/{c.name}\n\ngo 1.24\n\nrequire {module} {c.version}\n",
            "tools.go": _tools_go(c.packages),
        }

    return files


_VERSIONED_REPLACE = re.compile(r"^\s*(?:replace\s+)?([\w./-]+)\s+=>\s+([\w./-]+)\s+(v\S+)\s*$", re.MULTILINE)


def versioned_replaces(go_mod: str) -> list[str]:
    """A go.mod's `replace A => B vX` lines (not the ones into a local path), as `A => B vX`."""
    return [f"{a} => {b} {v}" for a, b, v in _VERSIONED_REPLACE.findall(go_mod)]


def required_version(go_mod: str, module: str) -> str:
    """The version a go.mod requires of `module`."""
    found = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", go_mod, re.MULTILINE)
    if found is None:
        raise KeyError(f"the go.mod requires no {module}")
    return found.group(1)


PROMETHEUS_OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator"


def _prometheus_operator_files(c: GoComponent) -> dict[str, str]:
    # Prometheus' go.mod replaces cloud.google.com/go with a release that no longer holds
    # compute/metadata; replace lines bind only the main module, so without them here `go mod tidy`
    # finds that package in two modules. The wrapper carries the Prometheus release's own replaces.
    upstream = Path(_go_mod_download(f"{PROMETHEUS_OPERATOR_MODULE}@{c.version}")["GoMod"]).read_text()
    prometheus = required_version(upstream, "github.com/prometheus/prometheus")
    prom_go_mod = Path(_go_mod_download(f"github.com/prometheus/prometheus@{prometheus}")["GoMod"]).read_text()
    replaces = "\n".join(f"\t{r}" for r in versioned_replaces(prom_go_mod))
    go_mod = (
        f"module voxscale.local/{c.name}\n\ngo 1.26\n\nrequire {PROMETHEUS_OPERATOR_MODULE} {c.version}\n\n"
        f"replace (\n{replaces}\n)\n"
    )
    return {"go.mod": go_mod, "tools.go": _tools_go(c.packages)}


def _etcd_files(c: GoComponent) -> dict[str, str]:
    # etcd's server module carries relative replace lines, so it cannot be `go install`ed directly:
    # a two-line main that calls etcdmain.Main builds the real server from the published modules.
    main = (
        "package main\n\n"
        'import (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
        "func main() { etcdmain.Main(os.Args) }\n"
    )
    go_mod = f"module voxscale.local/etcd\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 {c.version}\n"
    return {"go.mod": go_mod, "main.go": main}


# The pod sandbox's process: it holds the pod's namespaces open and reaps zombies. Built here
# because the registry image (registry.k8s.io/pause) cannot be pulled on these machines.
_PAUSE_MAIN = """package main

import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tsigs := make(chan os.Signal, 1)
\tsignal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
\tfor s := range sigs {
\t\tif s != syscall.SIGCHLD {
\t\t\tos.Exit(0)
\t\t}
\t\tfor {
\t\t\tvar status syscall.WaitStatus
\t\t\tif pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil); pid <= 0 || err != nil {
\t\t\t\tbreak
\t\t\t}
\t\t}
\t}
}
"""


def _prometheus_release(module_version: str) -> str:
    """Prometheus publishes its Go module as v0.<minor>.<patch>: v0.54.1 is release 2.54.1, and
    from 3.0 the major is folded into the minor: v0.316.0 is release 3.16.0."""
    minor, patch = (int(n) for n in module_version.lstrip("v").split(".")[1:3])
    return f"{minor // 100}.{minor % 100}.{patch}" if minor >= 300 else f"2.{minor}.{patch}"


def _pause_files(c: GoComponent) -> dict[str, str]:
    return {"go.mod": "module voxscale.local/pause\n\ngo 1.24\n", "main.go": _PAUSE_MAIN}


def components(versions: dict[str, str] | None = None) -> dict[str, GoComponent]:
    v = versions or pinned_versions()
    k8s = v["kubernetes"]
    major, minor = k8s.lstrip("v").split(".")[:2]
    build_date = "1970-01-01T00:00:00Z"  # reproducible builds: the date is not part of the identity
    k8s_stamp = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        k8s_stamp += [
            f"-X {pkg}.gitVersion={k8s}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate={build_date}",
        ]
    k8s_cmds = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
    # The real worker node's binaries are a component of their own, so that a cluster without a
    # real node (the default) never waits for them and a cached control plane stays cached.
    node_cmds = ("kubelet", "kube-proxy")
    helm_major = v["helm"].lstrip("v").split(".")[0]
    return {
        "etcd": GoComponent(name="etcd", version=v["etcd"], binaries=("etcd",), packages=(".",), files=_etcd_files),
        "kubernetes": GoComponent(
            name="kubernetes",
            version=k8s,
            binaries=k8s_cmds,
            packages=tuple(f"k8s.io/kubernetes/cmd/{c}" for c in k8s_cmds),
            ldflags=tuple(k8s_stamp),
            files=_kubernetes_files,
        ),
        "kubernetes-node": GoComponent(
            name="kubernetes-node",
            version=k8s,
            binaries=node_cmds,
            packages=tuple(f"k8s.io/kubernetes/cmd/{c}" for c in node_cmds),
            ldflags=tuple(k8s_stamp),
            files=_kubernetes_files,
        ),
        # Debian's Prometheus is built without Kubernetes service discovery; the real node's pods are
        # found through it, so a real-node cluster runs this build (only that discovery compiled in).
        "prometheus": GoComponent(
            name="prometheus",
            version=v["prometheus"],
            binaries=("prometheus",),
            packages=("github.com/prometheus/prometheus/cmd/prometheus",),
            ldflags=(f"-X github.com/prometheus/common/version.Version={_prometheus_release(v['prometheus'])}",),
            tags=("remove_all_sd", "enable_kubernetes_sd"),
            files=_require_files("github.com/prometheus/prometheus"),
        ),
        # Only tests/test_prometheus_operator.py builds it (ON_DEMAND, never in `needed()`): the real
        # prometheus-operator turns the chart's ServiceMonitor/PodMonitor/PrometheusRule into Prometheus
        # configuration. Its own replace lines point into its repo and are ignored here: the
        # published pkg/apis and pkg/client modules of the same version are used instead.
        "prometheus-operator": GoComponent(
            name="prometheus-operator",
            version=v["prometheus-operator"],
            binaries=("operator",),
            packages=(f"{PROMETHEUS_OPERATOR_MODULE}/cmd/operator",),
            ldflags=(f"-X github.com/prometheus/common/version.Version={v['prometheus-operator'].lstrip('v')}",),
            files=_prometheus_operator_files,
        ),
        "pause": GoComponent(
            name="pause", version=v["pause"], binaries=("pause",), packages=(".",), files=_pause_files
        ),
        "kwok": GoComponent(
            name="kwok",
            version=v["kwok"],
            binaries=("kwok",),
            packages=("sigs.k8s.io/kwok/cmd/kwok",),
            ldflags=(f"-X sigs.k8s.io/kwok/pkg/consts.Version={v['kwok'].lstrip('v')}",),
            files=_require_files("sigs.k8s.io/kwok"),
        ),
        "helm": GoComponent(
            name="helm",
            version=v["helm"],
            binaries=("helm",),
            packages=(f"helm.sh/helm/v{helm_major}/cmd/helm",),
            ldflags=(
                f"-X helm.sh/helm/v{helm_major}/internal/version.version={v['helm']}",
                f"-X helm.sh/helm/v{helm_major}/pkg/chartutil.k8sVersionMajor={major}",
                f"-X helm.sh/helm/v{helm_major}/pkg/chartutil.k8sVersionMinor={minor}",
            ),
            files=_require_files(f"helm.sh/helm/v{helm_major}"),
        ),
        # Only tests/test_hpa_advisory_e2e.py builds it (ON_DEMAND): the resource metrics API
        # (metrics.k8s.io) a real HorizontalPodAutoscaler reads, from the real node's kubelet.
        # metricsserver.py runs it; its go.mod has no replace lines, so the plain wrapper builds it.
        "metrics-server": GoComponent(
            name="metrics-server",
            version=v["metrics-server"],
            binaries=("metrics-server",),
            packages=("sigs.k8s.io/metrics-server/cmd/metrics-server",),
            # What its own Makefile stamps (it reports the client-go version variable as its own).
            ldflags=(f"-X k8s.io/client-go/pkg/version.gitVersion={v['metrics-server']}",),
            files=_require_files("sigs.k8s.io/metrics-server"),
        ),
        # Only the pre-pull test and bench build it (ON_DEMAND): an OCI registry on 127.0.0.1 for the real
        # node's containerd to pull from, so an image pull is a real one (registry.py). No replace lines.
        "registry": GoComponent(
            name="registry",
            version=v["registry"],
            binaries=("registry",),
            packages=("github.com/distribution/distribution/v3/cmd/registry",),
            ldflags=(f"-X github.com/distribution/distribution/v3/version.version={v['registry']}",),
            files=_require_files("github.com/distribution/distribution/v3"),
        ),
    }


def binary(name: str) -> Path:
    """Path of a built binary by its command name (e.g. 'kube-apiserver')."""
    for comp in components().values():
        if name in comp.binaries:
            return comp.path(name)
    raise KeyError(f"no component builds {name!r}")


def _say(msg: str) -> None:
    print(f"[voxscale build] {msg}", file=sys.stderr, flush=True)


def _run_with_progress(cmd: list[str], cwd: Path, what: str, env: dict[str, str]) -> None:
    """Run a go command, printing a heartbeat with elapsed time and packages compiled so far."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(30):
            elapsed = int(time.monotonic() - start)
            _say(f"{what}: still working, {elapsed // 60}m{elapsed % 60:02d}s, {len(lines)} steps so far")

    t = threading.Thread(target=heartbeat, daemon=True)
    t.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
    rc = proc.wait()
    done.set()
    if rc != 0:
        tail = "\n".join(lines[-40:])
        raise RuntimeError(f"{what} failed (exit {rc}): {' '.join(cmd)}\n{tail}")


def build(comp: GoComponent, force: bool = False) -> Path:
    """Build one component into its cache folder unless it is already there."""
    if comp.is_built() and not force:
        return comp.bin_dir
    if shutil.which("go") is None:
        raise RuntimeError("the Go toolchain ('go') is not on PATH; it is needed to build the local cluster")
    start = time.monotonic()
    src = cache_root() / "src" / f"{comp.name}-{comp.version}"
    src.mkdir(parents=True, exist_ok=True)
    _say(f"{comp.name} {comp.version}: preparing wrapper module in {src}")
    for rel, content in comp.files(comp).items():
        (src / rel).write_text(content)
    env = dict(os.environ, GOFLAGS="-mod=mod")
    _run_with_progress(["go", "mod", "tidy"], src, f"{comp.name}: resolving modules", env)
    comp.bin_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=comp.bin_dir.parent, prefix=f".{comp.name}-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        _say(f"{comp.name} {comp.version}: compiling {', '.join(comp.binaries)} (a cold build takes minutes)")
        cmd = ["go", "build", "-v", "-trimpath", "-ldflags", " ".join(("-s", "-w", *comp.ldflags))]
        cmd += [f"-tags={','.join(comp.tags)}"] if comp.tags else []
        cmd += ["-o", str(out) + os.sep, *comp.packages]
        _run_with_progress(cmd, src, f"{comp.name}: compiling", env)
        missing = [b for b in comp.binaries if not (out / b).exists()]
        if missing:
            raise RuntimeError(f"{comp.name}: build produced no {missing} in {out}")
        if comp.bin_dir.exists():
            shutil.rmtree(comp.bin_dir)
        out.rename(comp.bin_dir)
    _say(f"{comp.name} {comp.version}: built in {time.monotonic() - start:.0f}s -> {comp.bin_dir}")
    return comp.bin_dir


# Components that no cluster runs; only the test that needs one builds it (a cold build takes minutes).
ON_DEMAND = frozenset({"prometheus-operator", "metrics-server", "registry"})


def needed(real_node: bool = False) -> list[str]:
    """The components a local cluster runs: the real worker node adds kubelet, kube-proxy, pause
    and a Prometheus with Kubernetes service discovery."""
    base = ["etcd", "kubernetes", "kwok", "helm"]
    return base + (["kubernetes-node", "pause", "prometheus"] if real_node else [])


def ensure_all(names: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Build whatever is missing; say nothing when everything is cached. With no names: every
    component but the ON_DEMAND ones (`make deps` never waits for a build only one test needs)."""
    comps = components()
    wanted = names or [n for n in comps if n not in ON_DEMAND]
    unknown = sorted(set(wanted) - set(comps))
    if unknown:
        raise KeyError(f"unknown component(s) {unknown}; known: {sorted(comps)}")
    return {n: build(comps[n], force=force) for n in wanted}
