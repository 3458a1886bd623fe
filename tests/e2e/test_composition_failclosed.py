"""A composition that does not compile never freezes a bundle, and events never queue
reconciles (issue 12, findings F3 and F5), against a real kube-apiserver with the operator as a
process under the chart's RBAC.

F3: when the policies binding a ServiceAccount stop composing (a baseline added later, or two
policies admitted in a race), its bundle is replaced by one that refuses every statement and says
why, signed like any bundle. So a later baseline still reaches it and a replayed older bundle is
repaired; before, the bundle kept its last content forever. A namespace user's policy that would
break a composition is refused when it is applied, naming the other policy and the field.

F5: a churn of patches to ConfigMaps named like bundles costs a handful of reconciles, not one
per event, and the admission webhooks answer promptly meanwhile (latencies are printed).
"""

from __future__ import annotations

import re
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from dbgov_operator import bundle as bundling
from dbgov_policy import compile as policy_compile
from dbgov_sidecar import policies, policy_port

from . import kube
from .operator_proc import GROUP, PLURAL, VERSION, Installed, create_policy, get_policy, policy, wait_for
from .test_bundle_integrity import _verifies
from .test_operator import ENROLLED, bundle, deployed, pod, service_account

CLUSTER_PLURAL = "clusterdatabaseaccesspolicies"
RUN_LABEL = "dbgov.io/e2e-run"
NO_DDL: dict[str, Any] = {"name": "no-ddl", "verdict": "block", "statements": ["ddl", "dcl"]}
REPAIR_SECONDS = 10.0


@pytest.fixture(scope="module")
def installed(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    workdir = tmp_path_factory.mktemp("composition-failclosed")
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir) as found:
        yield found


@pytest.fixture
def baselines(installed: Installed) -> Iterator[list[str]]:
    """Names of the cluster policies a test creates; deleted afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        try:
            installed.custom.delete_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, name)
        except ApiException as err:
            if err.status != 404:
                raise


def _issuer(audience: str) -> dict[str, Any]:
    issuer = {"issuer": "https://idp.example", "audiences": [audience], "algorithms": ["RS256"]}
    return {"jwt": {"issuers": [{**issuer, "jwksUri": "https://idp.example/keys"}]}}


def _baseline(installed: Installed, baselines: list[str], name: str, *, run: str, **spec: Any) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterDatabaseAccessPolicy",
        "metadata": {"name": name},
        "spec": {
            "subjects": {"namespaceSelector": {"matchLabels": {RUN_LABEL: run}}},
            "default": "allow",
            "rules": [],
            **spec,
        },
    }
    installed.custom.create_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, body)
    baselines.append(name)


def _components(text: str) -> set[str]:
    header = text.splitlines()[0].split(": ", 1)[-1]
    return {c.strip() for c in header.split(",")}


def _bundle_of(installed: Installed, namespace: str, account: str, *, present: set[str]) -> dict[str, str]:
    """The data of ``account``'s bundle once its components include ``present``."""

    def current() -> dict[str, str] | None:
        found = bundle(installed, namespace, account)
        data = dict((found.data or {}) if found is not None else {})
        text = data.get("policy.yaml")
        return data if text is not None and present <= _components(text) else None

    return wait_for(f"the bundle of {account} with {sorted(present)}", current)


def _loaded(data: dict[str, str]) -> policy_port.Policy:
    return policies.build(policy_compile.load_text(data["policy.yaml"], source="policy.yaml"))


def _decide(loaded: policy_port.Policy, sql: str) -> policy_port.Decision:
    return loaded.decide(sql, loaded.new_context())


def _ready(installed: Installed, namespace: str, name: str) -> dict[str, Any]:
    status = get_policy(installed, namespace, name).get("status") or {}
    return dict({c["type"]: c for c in status.get("conditions") or []}.get("Ready") or {})


def test_a_composition_that_stops_compiling_refuses_everything_takes_later_baselines_and_repairs_replays(
    installed: Installed, namespace: str, baselines: list[str]
) -> None:
    run = uuid.uuid4().hex[:10]
    installed.core.patch_namespace(namespace, {"metadata": {"labels": {RUN_LABEL: run}}})
    own = policy("frz-own", subjects={"serviceAccounts": ["frz"]}, default="allow", rules=[])
    own["spec"]["authentication"] = _issuer("one")
    service_account(installed, namespace, "frz")
    create_policy(installed, namespace, own)
    older = _bundle_of(installed, namespace, "frz", present={"frz-own"})
    assert _decide(_loaded(older), "DROP TABLE shop.orders").verdict == "allow"

    # The admin's baseline configures the same issuer differently: the composition breaks.
    _baseline(installed, baselines, f"issuer-{run}", run=run, authentication=_issuer("two"))
    refusing = _bundle_of(installed, namespace, "frz", present={bundling.REFUSING, f"cluster:issuer-{run}"})
    assert _verifies(installed, namespace, refusing, account="frz")
    decision = _decide(_loaded(refusing), "SELECT 1")
    assert decision.verdict == "block"
    for said in ("frz-own", f"cluster:issuer-{run}", "configured differently", "fix or delete"):
        assert said in decision.reason, decision.reason
    ready = wait_for("frz-own: CompositionInvalid", lambda: _ready(installed, namespace, "frz-own") or None)
    assert (ready["status"], ready["reason"]) == ("False", "CompositionInvalid")
    assert "refuses every statement" in ready["message"]

    # A baseline added later still reaches the ServiceAccount's bundle (no freeze).
    _baseline(installed, baselines, f"no-ddl-{run}", run=run, rules=[NO_DDL])
    later = _bundle_of(
        installed,
        namespace,
        "frz",
        present={bundling.REFUSING, f"cluster:issuer-{run}", f"cluster:no-ddl-{run}"},
    )
    assert _verifies(installed, namespace, later, account="frz")

    # The older bundle, validly signed, written back: drift repair puts the refusal back.
    installed.core.patch_namespaced_config_map("dbgov-policy-frz", namespace, {"data": older})
    start = time.monotonic()
    repaired = _bundle_of(installed, namespace, "frz", present={bundling.REFUSING, f"cluster:no-ddl-{run}"})
    print(f"replayed bundle repaired in {time.monotonic() - start:.2f}s")
    assert time.monotonic() - start < REPAIR_SECONDS
    assert repaired["policy.yaml"] == later["policy.yaml"]


def _refusal(installed: Installed, namespace: str, body: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as err:
        create_policy(installed, namespace, body)
    assert err.value.status in (400, 422)
    return str(err.value.body)


def test_a_policy_that_would_break_a_composition_is_refused_at_apply_time(
    installed: Installed, namespace: str
) -> None:
    first = policy("first", authentication=_issuer("one"))
    create_policy(installed, namespace, first)
    message = _refusal(installed, namespace, policy("second", authentication=_issuer("two")))
    for said in (
        "does not compose",
        "spec.authentication.jwt.issuers[0]",
        "would not compose with first",
        "ServiceAccount orders",
        "configured differently",
    ):
        assert said in message, message
    with pytest.raises(ApiException) as gone:
        installed.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "second")
    assert gone.value.status == 404

    # The same settings elsewhere are fine; moving them onto orders is refused as well.
    elsewhere = policy("second", subjects={"serviceAccounts": ["billing"]}, authentication=_issuer("two"))
    create_policy(installed, namespace, elsewhere)
    with pytest.raises(ApiException) as moved:
        installed.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            "second",
            {"spec": {"subjects": {"serviceAccounts": ["orders"]}}},
        )
    assert moved.value.status in (400, 422)
    assert "would not compose with first" in str(moved.value.body)
    # The same issuer configured the same way composes.
    create_policy(installed, namespace, policy("third", authentication=_issuer("one")))


def _reconciles(installed: Installed, namespace: str) -> int:
    return len(re.findall(rf"Reconciled {re.escape(namespace)}:", installed.operator.log_text()))


def _admission_latency(installed: Installed, namespace: str, index: int) -> float:
    """One injection webhook round trip: a dry-run create of an enrolled pod."""
    start = time.monotonic()
    installed.core.create_namespaced_pod(namespace, pod(f"probe-{index}", labels=ENROLLED), dry_run="All")
    return time.monotonic() - start


def _churn(installed: Installed, namespace: str, *, names: list[str], stop: threading.Event) -> list[int]:
    """Patch ``names`` round-robin until ``stop``; returns how many patches were made (one slot)."""
    done = [0]

    def work() -> None:
        i = 0
        while not stop.is_set():
            name = names[i % len(names)]
            installed.core.patch_namespaced_config_map(name, namespace, {"data": {"junk": str(i)}})
            i += 1
            done[0] += 1

    threads = [threading.Thread(target=work, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join(timeout=10)
    return done


def test_a_churn_of_bundle_named_configmaps_is_coalesced_and_webhooks_stay_prompt(
    installed: Installed, namespace: str
) -> None:
    service_account(installed, namespace)
    create_policy(installed, namespace, policy("orders-read"))
    _bundle_of(installed, namespace, "orders", present={"orders-read"})
    names = [f"dbgov-policy-junk-{i}" for i in range(20)]
    for name in names:
        installed.core.create_namespaced_config_map(
            namespace, {"metadata": {"name": name}, "data": {"junk": ""}}
        )
    quiet = [_admission_latency(installed, namespace, i) for i in range(10)]
    time.sleep(2)
    before = _reconciles(installed, namespace)

    stop = threading.Event()
    patched: list[list[int]] = []
    churner = threading.Thread(
        target=lambda: patched.append(_churn(installed, namespace, names=names, stop=stop)), daemon=True
    )
    started = time.monotonic()
    churner.start()
    busy: list[float] = []
    while time.monotonic() - started < 12:
        busy.append(_admission_latency(installed, namespace, 100 + len(busy)))
        time.sleep(0.1)
    stop.set()
    churner.join(timeout=20)
    lasted = time.monotonic() - started
    during = _reconciles(installed, namespace) - before
    time.sleep(3)
    settled = _reconciles(installed, namespace)
    time.sleep(3)
    after = _reconciles(installed, namespace)

    patches = patched[0][0] if patched else 0
    p99 = statistics.quantiles(busy, n=100, method="inclusive")[98]
    print(
        f"{patches} patches of {len(names)} ConfigMaps in {lasted:.1f}s -> {during} reconciles; "
        f"injection webhook quiet median {statistics.median(quiet) * 1000:.0f} ms, during the churn "
        f"median {statistics.median(busy) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(busy) * 1000:.0f} ms"
    )
    assert patches > 200, "the churn did not get going"
    # Coalesced: each reconcile waits COALESCE_SECONDS for the rest of its burst, so at most one
    # per 0.25 s (plus the one running when it started), whatever the number of events.
    assert during <= lasted / 0.25 + 2, (during, patches)
    assert during < patches / 5, (during, patches)
    assert after == settled, "reconciles kept running after the churn stopped (a backlog)"
    assert p99 < 1.0, busy
