// The pod sandbox ("pause") binary of the e2e node (tests/e2e/node.py): containerd needs a
// sandbox image, and no registry is reachable to pull registry.k8s.io/pause. Standard library only.
module github.com/dbgov/dbgov/hack/tools/pause

go 1.24.0
