"""dbgov's Kubernetes operator: policies, sidecar injection, credentials, approvals, audit."""
