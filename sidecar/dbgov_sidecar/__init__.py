"""dbgov's sidecar: a PostgreSQL wire-protocol proxy that enforces dbgov policies."""
