#!/usr/bin/env bash
# Install the Debian packages voxscale's tests and demo use, only if missing; silent otherwise.
set -euo pipefail

# command -> Debian package
declare -A wanted=(
  [prometheus]=prometheus
  [espeak-ng]=espeak-ng
  [podman]=podman
  [runc]=runc
  [mmdebstrap]=mmdebstrap
  # The local cluster's real worker node (`voxscale cluster up --real-node`).
  [containerd]=containerd
  [iptables]=iptables
  [ip]=iproute2
  [conntrack]=conntrack
)
missing=()
for cmd in "${!wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 \
    || missing+=("${wanted[$cmd]}")
done
# CNI plugins are not commands on PATH.
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
if ! command -v go >/dev/null 2>&1; then
  echo "the Go toolchain (go) is required to build the local control plane; install Go >= 1.24" >&2
  exit 1
fi
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
