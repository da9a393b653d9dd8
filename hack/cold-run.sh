#!/usr/bin/env bash
# The fresh-machine path, proven without a fresh machine: clone HEAD into a scratch folder and run
# make targets there with every cache empty, timing each one.
#
#   hack/cold-run.sh [--keep] [TARGET ...]      (default target: test; e.g. `demo test`)
#   make cold-run TARGETS='demo test'
#   VOXSCALE_COLD_DIR=/var/tmp/cold hack/cold-run.sh test   (where the scratch folder goes)
#
# Empty, inside the scratch folder: voxscale's binary cache (Go-built control plane, real node,
# Prometheus, and the real node's containerd image store), Go's build and module caches, pip's cache,
# podman's image store (graphroot/runroot through CONTAINERS_STORAGE_CONF), the clusters' state
# folders, and the virtualenv (a fresh clone has none). Not emptied: Debian's packages (system-wide;
# `hack/install-system-deps.sh` installs them on a machine that lacks them) and the Go toolchain.
# The committed tree is what runs: uncommitted changes are not in the clone (a warning says so).
# One real node per machine: do not run this beside another `make test`.
# At the end the scratch folder is removed (podman's store first, through podman), unless --keep.
set -euo pipefail
cd "$(dirname "$0")/.."

keep=0
if [ "${1:-}" = "--keep" ]; then keep=1; shift; fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(test)

say() { echo "[cold-run] $*" >&2; }

scratch="${VOXSCALE_COLD_DIR:-$(mktemp -d /var/tmp/voxscale-cold.XXXXXX)}"
mkdir -p "$scratch"
scratch="$(cd "$scratch" && pwd)"
[ -z "$(git status --porcelain --untracked-files=no)" ] || say "uncommitted changes are not part of the run (it clones HEAD)"

git clone --quiet "$PWD" "$scratch/src"
mkdir -p "$scratch/cache" "$scratch/logs" "$scratch/containers/root" "$scratch/containers/runroot" "$scratch/state"
cat > "$scratch/containers/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$scratch/containers/root"
runroot = "$scratch/containers/runroot"
EOF
export CONTAINERS_STORAGE_CONF="$scratch/containers/storage.conf"
export VOXSCALE_CACHE_DIR="$scratch/cache/voxscale"
export VOXSCALE_STATE_DIR="$scratch/state"
export XDG_CACHE_HOME="$scratch/cache"
export GOCACHE="$scratch/cache/go-build"
export GOMODCACHE="$scratch/cache/go-mod"
export GOPATH="$scratch/go"
export PIP_CACHE_DIR="$scratch/cache/pip"

cleanup() {
  if [ "$keep" = 1 ]; then say "kept $scratch (logs in $scratch/logs)"; return; fi
  # Stop any cluster a failed run left, then empty podman's store through podman (overlay mounts).
  (cd "$scratch/src" && [ -x .venv/bin/voxscale ] && for d in "$scratch/state"/*/; do
     [ -d "$d" ] && .venv/bin/voxscale cluster down --name "$(basename "$d")" >/dev/null 2>&1; done) || true
  podman system reset --force >/dev/null 2>&1 || true
  rm -rf "$scratch" 2>/dev/null || say "could not remove all of $scratch"
}
trap cleanup EXIT

say "scratch folder $scratch; caches empty; targets: ${targets[*]}"
total=0
rc=0
for target in "${targets[@]}"; do
  started=$(date +%s)
  say "make $target (log: $scratch/logs/$target.log)"
  if (cd "$scratch/src" && make "$target") >"$scratch/logs/$target.log" 2>&1; then status=passed; else status=failed; rc=1; fi
  took=$(( $(date +%s) - started ))
  total=$(( total + took ))
  say "make $target: $status in $((took / 60))m$((took % 60))s"
  grep -E "^=+ .*(passed|failed|error).* =+$" "$scratch/logs/$target.log" | tail -1 >&2 || true
  if [ "$status" = failed ]; then tail -40 "$scratch/logs/$target.log" >&2; keep=1; break; fi
done
say "total $((total / 60))m$((total % 60))s"
exit $rc
