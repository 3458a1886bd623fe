#!/usr/bin/env bash
# Builds the e2e control plane (kube-apiserver, etcd, kube-controller-manager), the e2e node
# (kubelet and its pod sandbox binary, pause) and helm from the Go modules pinned under
# hack/tools/, into a cache outside the repository:
#
#   ${DBGOV_TOOLS_DIR:-$HOME/.cache/dbgov/tools}/<name>-<version>/<name>
#
# A binary is built only when missing, so re-running is cheap. Cold builds take 10-20 minutes on
# two cores (kube-apiserver dominates); a warm Go build cache brings that to about a minute.
# Needs Go (>= 1.24) and the Go module proxy; no Docker. Prints where the binaries are.
set -euo pipefail
shopt -s inherit_errexit

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools_src="${here}/tools"
tools_dir="${DBGOV_TOOLS_DIR:-${HOME}/.cache/dbgov/tools}"

# shellcheck source=tools/versions.env
source "${tools_src}/versions.env"

# Go is needed only when something must be built.
find_go() {
  if [[ -n "${GO:-}" ]]; then
    echo "${GO}"
  elif command -v go >/dev/null 2>&1; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    echo /usr/local/go/bin/go
  else
    echo "build-tools: Go >= 1.24 is required to build the tools (set GO=/path/to/go)" >&2
    return 1
  fi
}

# Never let a go.mod download a different toolchain behind our back; build static binaries.
export GOTOOLCHAIN=local CGO_ENABLED=0

log() { printf 'build-tools: %s\n' "$*" >&2; }

# build <name> <version> <module dir> <package> <ldflags function>
build() {
  local name="$1" version="$2" moddir="$3" pkg="$4" ldflags_fn="$5"
  local dest="${tools_dir}/${name}-${version}/${name}"
  if [[ -x "${dest}" ]]; then
    log "${name} ${version}: cached"
  else
    local go_bin
    go_bin="$(find_go)"
    log "${name} ${version}: building ${pkg} with $("${go_bin}" env GOVERSION) (this can take a while)"
    mkdir -p "$(dirname "${dest}")"
    local start=${SECONDS} ldflags
    ldflags="$("${ldflags_fn}" "${go_bin}")"
    # Build to a temporary name and rename, so an interrupted (or concurrent) build never
    # leaves a half-written binary under the final name.
    (cd "${moddir}" && "${go_bin}" build -mod=readonly -trimpath -ldflags "-s -w ${ldflags}" \
      -o "${dest}.tmp.$$" "${pkg}")
    mv -f "${dest}.tmp.$$" "${dest}"
    log "${name} ${version}: built in $((SECONDS - start))s"
  fi
  printf '%s=%s\n' "${name}" "${dest}"
}

kube_mm="${KUBE_VERSION#v}"
kube_major="${kube_mm%%.*}"
kube_minor="${kube_mm#*.}"
kube_minor="${kube_minor%%.*}"

# /version must report the real release, or helm's kubeVersion checks and anything else that
# reads the server version see v0.0.0-master.
kube_ldflags() {
  local kv=k8s.io/component-base/version date
  date="$(cd "${tools_src}/kube-apiserver" && "$1" list -mod=readonly -m \
    -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
  printf '%s ' "-X ${kv}.gitMajor=${kube_major}" "-X ${kv}.gitMinor=${kube_minor}" \
    "-X ${kv}.gitVersion=${KUBE_VERSION}" "-X ${kv}.gitTreeState=clean" \
    "-X ${kv}.gitCommit=" "-X ${kv}.buildDate=${date}"
}

etcd_ldflags() {
  printf '%s' "-X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}"
}

# helm's .Capabilities.KubeVersion (used by `helm template`) defaults to the linked-in values.
helm_ldflags() {
  printf '%s ' "-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
    "-X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=${kube_major}" \
    "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${kube_minor}"
}

build etcd "${ETCD_VERSION}" "${tools_src}/etcd" go.etcd.io/etcd/server/v3 etcd_ldflags
build helm "${HELM_VERSION}" "${tools_src}/helm" helm.sh/helm/v3/cmd/helm helm_ldflags
build kube-apiserver "${KUBE_VERSION}" "${tools_src}/kube-apiserver" \
  k8s.io/kubernetes/cmd/kube-apiserver kube_ldflags
# Only the garbage-collection e2e tests run it (tests/e2e/test_garbage_collection.py). Its own
# module (its go.mod says why); the same release and version ldflags as kube-apiserver.
build kube-controller-manager "${KUBE_VERSION}" "${tools_src}/kube-controller-manager" \
  k8s.io/kubernetes/cmd/kube-controller-manager kube_ldflags
# The real-pods node (tests/e2e/node.py). Its own module: cadvisor and the container runtime
# clients must not move the apiserver's dependency versions. About 4 minutes cold on 2 cores.
build kubelet "${KUBE_VERSION}" "${tools_src}/kubelet" k8s.io/kubernetes/cmd/kubelet kube_ldflags
no_ldflags() { :; }
# The node's sandbox image holds this one static binary; bump PAUSE_VERSION when main.go changes.
build pause "${PAUSE_VERSION}" "${tools_src}/pause" . no_ldflags
