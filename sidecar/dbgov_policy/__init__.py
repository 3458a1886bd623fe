"""dbgov's policy engine: pure functions from a policy document and SQL text to a decision.

Nothing in this package touches a socket, a file, the clock or an event loop; the sidecar,
the operator and the CLI all call into it, so one compiled policy means the same thing
everywhere.
"""
