"""``python -m dbgov_operator``: run the operator with settings from the environment.

Several replicas: set ``DBGOV_PEERING`` to a kopf peering name (the kopfpeerings.kopf.dev CRDs
must be installed); kopf then lets exactly one replica handle resources while every replica
serves admission requests with the shared certificate. Empty runs standalone, one replica.
"""

import logging
import os
import sys

import kopf
import kubernetes

from dbgov_operator import runtime, settings


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

    kopf.run(
        clusterwide=True,
        standalone=not config.peering,
        peering_name=config.peering or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
