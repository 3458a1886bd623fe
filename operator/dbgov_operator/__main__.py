"""``python -m dbgov_operator``: run the operator with settings from the environment.

Several replicas use kopf peering, not a separate leader election: set ``DBGOV_PEERING`` to the
name of a ClusterKopfPeering object (its CRD, clusterkopfpeerings.kopf.dev, must be installed).
Each replica takes a random peering priority unless ``DBGOV_PEERING_PRIORITY`` is set, so the
highest one handles resources and the others pause; when it goes, the next one resumes. Every
replica serves admission requests and the credential endpoint (both read what they need from the
API at request time, never from the paused handlers' state) with the certificate they share
through the Secret. An empty ``DBGOV_PEERING`` runs standalone: exactly one replica.

kopf watches every ClusterKopfPeering and ignores the others; a field selector on its own name
lets the chart's RBAC name that one object for list and watch too, not only for patch.
"""

import logging
import os
import random
import sys

import kopf
import kubernetes

from dbgov_operator import kopf_timers, runtime, settings

PEERINGS = ("kopf.dev", "clusterkopfpeerings")
"""kopf's cluster-wide peering resource (the operator always runs cluster-wide)."""


def api_client() -> object:
    """An API client from the in-cluster ServiceAccount, else from KUBECONFIG."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    return kubernetes.client.ApiClient()


def main() -> int:
    config = settings.from_env(os.environ)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    runtime.configure(config, client=api_client())
    from dbgov_operator import handlers  # noqa: F401, PLC0415 -- registers the handlers

    kopf_timers.release_timer_finalizers()  # after the handlers registered their timers

    priority = config.peering_priority or random.SystemRandom().randint(1, 2**31 - 1)
    operator_settings = kopf.OperatorSettings()
    if config.peering:
        operator_settings.watching.field_selectors[PEERINGS] = f"metadata.name={config.peering}"
    kopf.run(
        settings=operator_settings,
        clusterwide=True,
        standalone=not config.peering,
        peering_name=config.peering or None,
        priority=priority,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
