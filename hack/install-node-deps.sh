#!/usr/bin/env bash
# Installs what the e2e node (tests/e2e/node.py) runs pods with, from Debian's packages:
# containerd and runc (the container runtime), the CNI plugins (bridge, host-local, loopback),
# iproute2 (cleanup of the node's bridge) and debootstrap (the root filesystems of the test
# images, tests/e2e/images.py). The kubelet itself is built from Go modules (hack/build-tools.sh).
#
# Only missing packages are installed, so re-running is cheap. The node runs pods as root (cgroups,
# network namespaces, mounts): like CI, run this as root, or where sudo works without a password.
set -euo pipefail

packages=(containerd runc containernetworking-plugins iproute2 debootstrap)

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("${pkg}")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-node-deps: ${packages[*]}: installed" >&2
  exit 0
fi

as_root=()
if [[ ${EUID} -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    echo "install-node-deps: ${missing[*]} missing, and installing needs root (the e2e node" \
      "runs pods as root): run \`make node-deps\` as root" >&2
    exit 1
  fi
fi

echo "install-node-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
# Debian's package starts containerd as a service on the default socket; the node starts its own
# with a private root and socket, and does not use (or stop) that one.
