#!/usr/bin/env bash
# `make images`: build Dockerfile.operator and Dockerfile.inference as they are, without a Docker
# engine (podman with runc). No registry is reachable here, so a base image the FROM line names
# and the local store lacks is made from Debian's packages (mmdebstrap of bookworm, with CPython
# 3.11 in a venv first on PATH, as python:3.11-slim has it) and tagged with that name; the builds
# then run with pulls disabled. Elsewhere podman or docker simply pull the real base image.
#
#   hack/build-images.sh [operator|inference|piper|triton ...]   (default: operator and inference)
#   (piper: Piper's own HTTP server, a server nobody here wrote, for the tests that attach to it;
#    triton: NVIDIA Triton from the nvidia-pytriton wheel serving Piper, for the triton metric profile)
#   VOXSCALE_IMAGE_TAG=dev  VOXSCALE_IMAGE_PREFIX=localhost/voxscale
#
# Quiet and instant when an image is up to date: each image carries the label
# voxscale.dev/inputs, a hash of everything its Dockerfile copies in (the files git knows, tracked or
# not ignored) and of the Dockerfile and this script; a tag whose label matches is not rebuilt.
# `make test` runs this before pytest, so no test waits for an image build.
set -euo pipefail
cd "$(dirname "$0")/.."

tag="${VOXSCALE_IMAGE_TAG:-dev}"
prefix="${VOXSCALE_IMAGE_PREFIX:-localhost/voxscale}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(operator inference)

say() { echo "[images] $*" >&2; }

# Root here has no CAP_SYS_RESOURCE: containers must not try to raise ulimits; crun refuses the
# hybrid cgroup v1 layout, runc accepts it.
if [ ! -s /etc/containers/containers.conf ] && [ "$(id -u)" -eq 0 ]; then
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n' \
    > /etc/containers/containers.conf
fi

base_image() {
  local ref="$1"
  if podman image exists "$ref"; then return; fi
  case "$ref" in
    python:3.11-slim|docker.io/library/python:3.11-slim) ;;
    *) say "base image $ref is not in the local store and no registry is reachable"; exit 1 ;;
  esac
  say "making $ref from Debian bookworm's packages (mmdebstrap; about 30 s)"
  local tmp; tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  local hooks=()
  # This machine reaches package registries through a TLS proxy whose CA it trusts; the image must too.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    hooks+=(--customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share'
            --customize-hook='chroot "$1" update-ca-certificates')
  fi
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
    "${hooks[@]}" --customize-hook='chroot "$1" python3 -m venv /usr/local/py' \
    bookworm "$tmp/rootfs.tar"
  podman import --quiet \
    --change 'ENV PATH=/usr/local/py/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' "$tmp/rootfs.tar" "docker.io/library/$ref" >/dev/null
}

# The build context as the Dockerfiles use it: pyproject.toml and the four package folders (the
# Dockerfiles write a stub README.md, so the README is not an input)
# (Dockerfile.piper copies nothing in: its Dockerfile is its only input).
inputs_hash() {
  local file="$1" listed
  local context=(pyproject.toml voxscale operator inference crds)
  [ "$file" != Dockerfile.piper ] || context=()
  [ "$file" != Dockerfile.triton ] || context=(examples/servers/triton)
  if [ ${#context[@]} -eq 0 ]; then listed=""
  elif listed=$(git ls-files -co --exclude-standard -- "${context[@]}" 2>/dev/null); then :
  else listed=$(find "${context[@]}" -type f -not -path '*/__pycache__/*'); fi
  { sha256sum "$file" hack/build-images.sh  # names relative to the repository root: the same from make and pytest
    while IFS= read -r f; do if [ -f "$f" ]; then sha256sum "$f"; fi; done < <(LC_ALL=C sort <<<"$listed")
  } | sha256sum | cut -c1-16
}

for target in "${targets[@]}"; do
  file="Dockerfile.$target"
  [ -f "$file" ] || { say "unknown image '$target' (operator, inference, piper or triton)"; exit 2; }
  inputs=$(inputs_hash "$file")
  label=$(podman image inspect --format '{{index .Labels "voxscale.dev/inputs"}}' "$prefix/$target:$tag" 2>/dev/null || true)
  [ "$label" = "$inputs" ] && continue
  for ref in $(awk 'toupper($1) == "FROM" {print $2}' "$file" | sort -u); do base_image "$ref"; done
  say "building $prefix/$target:$tag from $file"
  started=$SECONDS
  previous=$(podman image inspect --format '{{.Id}}' "$prefix/$target:$tag" 2>/dev/null || true)
  podman build --quiet --pull=never --network host --label "voxscale.dev/inputs=$inputs" \
    -f "$file" -t "$prefix/$target:$tag" . >/dev/null
  size=$(podman image inspect --format '{{.Size}}' "$prefix/$target:$tag")
  current=$(podman image inspect --format '{{.Id}}' "$prefix/$target:$tag")
  # The image this tag replaced would otherwise stay as an untagged 6 GB layer stack on every rebuild;
  # podman keeps it if another tag or a container still uses it.
  if [ -n "$previous" ] && [ "$previous" != "$current" ]; then podman image rm "$previous" >/dev/null 2>&1 || true; fi
  say "built $prefix/$target:$tag in $((SECONDS - started)) s ($((size / 1000000)) MB)"
done
