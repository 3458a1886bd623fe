#!/usr/bin/env bash
# End-to-end on a real (kind) cluster: build both images, install the chart, enroll a workload
# and check the sidecar was injected and a policy became Ready.
#
# Needs Docker, kind and kubectl on PATH (none of which `make test` uses; the CI suite runs
# against a bare kube-apiserver instead, see tests/e2e/kube.py). helm comes from
# hack/build-tools.sh. Usage:
#
#   make kind-e2e                 # or: hack/kind-e2e.sh
#   KEEP=1 make kind-e2e          # keep the cluster afterwards for poking around
#   KIND_CLUSTER=x KIND_NODE_IMAGE=kindest/node:v1.34.0 make kind-e2e
set -euo pipefail
shopt -s inherit_errexit

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${KIND_CLUSTER:-dbgov-e2e}"
tag="${IMAGE_TAG:-e2e}"
release_ns=dbgov-system
demo_ns=dbgov-demo

log() { printf 'kind-e2e: %s\n' "$*" >&2; }

for tool in docker kind kubectl; do
  command -v "${tool}" >/dev/null || { log "${tool} is required on PATH"; exit 1; }
done
helm="$("${repo}/hack/build-tools.sh" | sed -n 's/^helm=//p')"

created=0
if ! kind get clusters | grep -qx "${cluster}"; then
  log "creating kind cluster ${cluster}"
  kind create cluster --name "${cluster}" ${KIND_NODE_IMAGE:+--image "${KIND_NODE_IMAGE}"} --wait 120s
  created=1
fi
cleanup() {
  # Only a cluster this run created is deleted.
  if [[ "${created}" == 1 && "${KEEP:-0}" != 1 ]]; then
    log "deleting kind cluster ${cluster} (KEEP=1 keeps it)"
    kind delete cluster --name "${cluster}"
  fi
}
trap cleanup EXIT
export KUBECONFIG="${KUBECONFIG_OUT:-$(mktemp)}"
kind get kubeconfig --name "${cluster}" >"${KUBECONFIG}"

log "building images (tag ${tag})"
docker build -f "${repo}/Dockerfile.operator" -t "ghcr.io/dbgov/dbgov-operator:${tag}" "${repo}"
docker build -f "${repo}/Dockerfile.sidecar" -t "ghcr.io/dbgov/dbgov-sidecar:${tag}" "${repo}"
kind load docker-image --name "${cluster}" \
  "ghcr.io/dbgov/dbgov-operator:${tag}" "ghcr.io/dbgov/dbgov-sidecar:${tag}"

log "installing the chart"
"${helm}" upgrade --install dbgov "${repo}/charts/dbgov" \
  --namespace "${release_ns}" --create-namespace --kubeconfig "${KUBECONFIG}" \
  --set image.operator.tag="${tag}" --set image.sidecar.tag="${tag}" \
  --set image.operator.pullPolicy=Never --wait --timeout 5m
kubectl -n "${release_ns}" rollout status deploy/dbgov --timeout=180s
for crd in databaseaccesspolicies databases accessrequests; do
  kubectl wait --for=condition=Established "crd/${crd}.dbgov.io" --timeout=60s
done

log "enrolling a workload"
kubectl create namespace "${demo_ns}" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "${demo_ns}" apply -f - <<'EOF'
apiVersion: v1
kind: ServiceAccount
metadata:
  name: app
---
apiVersion: dbgov.io/v1alpha1
kind: Database
metadata:
  name: shop
spec:
  host: postgres.dbgov-demo.svc
  dbname: shop
  sslmode: disable
  adminSecretRef:
    name: shop-admin
---
apiVersion: dbgov.io/v1alpha1
kind: DatabaseAccessPolicy
metadata:
  name: app-readonly
spec:
  databaseRef:
    name: shop
  subjects:
    serviceAccounts: [app]
  default: block
  rules:
    - name: read
      verdict: allow
      statements: [select]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
spec:
  replicas: 1
  selector:
    matchLabels: {app: app}
  template:
    metadata:
      labels: {app: app, dbgov.io/inject: "true"}
    spec:
      serviceAccountName: app
      containers:
        - name: app
          image: busybox:1.36
          command: ["sleep", "infinity"]
EOF

log "checking the injected sidecar"
deadline=$((SECONDS + 120))
until kubectl -n "${demo_ns}" get pods -l app=app \
  -o jsonpath='{.items[0].spec.initContainers[*].name}' 2>/dev/null | grep -qw dbgov-proxy; do
  if ((SECONDS > deadline)); then
    kubectl -n "${demo_ns}" get pods -l app=app -o yaml >&2 || true
    kubectl -n "${release_ns}" logs deploy/dbgov --tail=100 >&2 || true
    log "FAIL: no dbgov-proxy init container in the app pod"
    exit 1
  fi
  sleep 2
done
kubectl -n "${demo_ns}" wait --for=condition=Ready dap/app-readonly --timeout=120s
kubectl -n "${demo_ns}" get dap
log "PASS"
