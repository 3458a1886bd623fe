"""With minted credentials nothing about reaching or trusting the database comes from the app.

In a cluster the injected upstream (DBGOV_UPSTREAM) is built from the app's PG* variables, and
an attacker showed that an app setting PGSSLROOTCERT to its own CA, PGCHANNELBINDING=disable and
the database's name to its own listener received the minted password. The operator's answer
decides host, port, dbname, sslmode and CA; the app's CA file, client certificate and channel
binding are dropped."""

from __future__ import annotations

import datetime

import pytest

from dbgov_sidecar import config, proxy, workload_identity

APP = proxy.UpstreamConfig(
    host="db.platform.example.com",
    port=5432,
    user="app",
    password="app-pw",
    database="shop",
    sslmode="verify-full",
    sslrootcert="/mine/ca.crt",
    channel_binding="disable",
    sslcert="/mine/client.pem",
    sslkey="/mine/client.key",
)


def _creds(*, sslmode: str, ca_pem: str | None) -> workload_identity.Credentials:
    return workload_identity.Credentials(
        user="dbgov_w_1",
        password="MINTED-SECRET",
        valid_until=datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=15),
        host="pg.data.svc.cluster.local",
        port=5433,
        dbname="orders",
        sslmode=sslmode,
        ca_pem=ca_pem,
    )


@pytest.mark.parametrize("ca_pem", [None, "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n"])
def test_the_apps_tls_settings_never_reach_a_minted_login(ca_pem: str | None) -> None:
    up = config.minted_upstream(APP, lambda: _creds(sslmode="verify-full", ca_pem=ca_pem))()
    assert (up.host, up.port, up.database, up.user, up.password) == (
        "pg.data.svc.cluster.local",
        5433,
        "orders",
        "dbgov_w_1",
        "MINTED-SECRET",
    )
    # the operator's CA or the system store; never the app's file, certificate or binding choice
    assert up.sslrootcert is None and up.ssl_ca_pem == ca_pem
    assert up.sslcert is None and up.sslkey is None
    assert up.channel_binding == "prefer" and up.masking_views


@pytest.mark.parametrize("sslmode", ["require", "verify-ca"])
def test_tls_that_does_not_verify_the_name_requires_channel_binding(sslmode: str) -> None:
    up = config.minted_upstream(APP, lambda: _creds(sslmode=sslmode, ca_pem=None))()
    assert up.sslmode == sslmode and up.channel_binding == "require"
