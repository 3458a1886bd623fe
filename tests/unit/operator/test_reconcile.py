"""The namespace reconciler against an in-memory API (the real one is in tests/e2e)."""

import datetime
from collections.abc import Mapping
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from dbgov_operator import bundle, kubeapi, reconcile, settings, signing
from dbgov_operator.kubetypes import ConfigMap, PolicyStatus
from dbgov_sidecar import bundle_signature

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
CONFIG = settings.Settings()
GOOD: dict[str, Any] = {
    "subjects": {"serviceAccounts": ["orders"]},
    "databaseRef": {"name": "db"},
    "default": "block",
    "rules": [{"name": "read", "verdict": "allow", "statements": ["select"]}],
}
BAD: dict[str, Any] = {
    "subjects": {"serviceAccounts": ["orders"]},
    "databaseRef": {"name": "db"},
    "rules": [{"name": "r", "verdict": "allow", "statements": ["selekt"]}],
}


class FakeApi:
    def __init__(self) -> None:
        self.policies: dict[str, dict[str, Any]] = {}
        self.pods: list[bundle.Workload] = []
        self.config_maps: dict[str, dict[str, Any]] = {}
        self.writes: list[str] = []
        self.service_accounts: dict[str, str] = {"orders": "uid-orders", "agent": "uid-agent"}
        """name -> uid: only these get bundles."""

    def add_policy(self, name: str, spec: dict[str, Any], generation: int = 1) -> None:
        meta = {"name": name, "namespace": "apps", "generation": generation, "uid": name}
        self.policies[name] = {"metadata": meta, "spec": spec, "status": {}}

    def list_policies(self, namespace: str) -> list[kubeapi.PolicyObject]:
        return [
            kubeapi.PolicyObject(
                name=name,
                generation=body["metadata"]["generation"],
                spec=body["spec"],
                status=body["status"],
                deleting="deletionTimestamp" in body["metadata"],
                body=body,
            )
            for name, body in self.policies.items()
        ]

    def list_workloads(self, namespace: str) -> list[bundle.Workload]:
        return list(self.pods)

    def list_bundles(self, namespace: str) -> dict[str, Mapping[str, Any]]:
        return dict(self.config_maps)

    def write_bundle(self, desired: ConfigMap, *, existing: Mapping[str, Any] | None) -> None:
        self.config_maps[desired["metadata"]["name"]] = dict(desired)
        self.writes.append(f"configmap/{desired['metadata']['name']}")

    def delete_bundle(self, *, namespace: str, name: str, resource_version: str | None) -> None:
        del self.config_maps[name]
        self.writes.append(f"delete/{name}")

    def list_service_accounts(self, namespace: str) -> dict[str, str]:
        return dict(self.service_accounts)

    def patch_policy_status(self, *, namespace: str, name: str, status: PolicyStatus) -> None:
        self.policies[name]["status"] = dict(status)
        self.writes.append(f"status/{name}")


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


def _run(api: FakeApi, events: list[tuple[str, str, str]] | None = None) -> reconcile.Outcome:
    def emit(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        if events is not None:
            events.append((body["metadata"]["name"], kind, reason))

    return reconcile.reconcile_namespace(api, namespace="apps", config=CONFIG, now=NOW, emit=emit)


def test_valid_policy_gets_a_bundle_and_ready_status(api: FakeApi) -> None:
    api.add_policy("read", GOOD)
    events: list[tuple[str, str, str]] = []
    outcome = _run(api, events)
    assert outcome.bundles_written == ("orders",)
    text = api.config_maps["dbgov-policy-orders"]["data"]["policy.yaml"]
    (component,) = yaml.safe_load(text)["policies"]
    assert (component["name"], component["spec"]["rules"][0]["name"]) == ("read", "read")
    status = api.policies["read"]["status"]
    assert status["boundWorkloads"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "PolicyValid": "True",
        "Ready": "True",
    }
    assert ("read", "Normal", "PolicyReady") in events
    assert ("read", "Normal", "BundleUpdated") in events


def test_second_run_writes_nothing_and_says_nothing(api: FakeApi) -> None:
    api.add_policy("read", GOOD)
    _run(api)
    api.writes.clear()
    events: list[tuple[str, str, str]] = []
    assert _run(api, events) == reconcile.Outcome(bundles_written=(), statuses_written=())
    assert api.writes == []
    assert events == []


def test_invalid_policy_is_reported_on_every_policy_and_the_bundle_refuses_everything(api: FakeApi) -> None:
    api.add_policy("read", GOOD)
    _run(api)
    before = api.config_maps["dbgov-policy-orders"]["data"]
    api.add_policy("broken", BAD)
    events: list[tuple[str, str, str]] = []
    _run(api, events)
    valid = {c["type"]: c for c in api.policies["broken"]["status"]["conditions"]}["PolicyValid"]
    assert valid["status"] == "False"
    assert valid["message"].startswith("spec.rules[0].statements[0]: unknown statement class")
    ready = {c["type"]: c for c in api.policies["read"]["status"]["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "CompositionInvalid")
    assert "(read with broken) does not compile" in ready["message"]
    assert "broken.rules[0].statements[0]" in ready["message"]
    after = api.config_maps["dbgov-policy-orders"]["data"]
    assert set(after) == set(before)
    for text in after.values():
        assert f"from: {bundle.REFUSING}\n" in text
    assert ("broken", "Warning", "PolicyInvalid") in events
    assert ("read", "Warning", "CompositionInvalid") in events


def test_policy_change_rewrites_the_bundle(api: FakeApi) -> None:
    api.add_policy("read", GOOD)
    _run(api)
    changed = {**GOOD, "rules": [*GOOD["rules"], {"name": "w", "verdict": "approve"}]}
    api.add_policy("read", changed, generation=2)
    api.policies["read"]["status"] = {}
    outcome = _run(api)
    assert outcome.bundles_written == ("orders",)
    text = api.config_maps["dbgov-policy-orders"]["data"]["policy.yaml"]
    (component,) = yaml.safe_load(text)["policies"]
    assert [r["name"] for r in component["spec"]["rules"]] == ["read", "w"]


def test_deleted_policy_leaves_a_blocking_bundle_while_a_pod_runs_as_its_account(api: FakeApi) -> None:
    api.add_policy("read", GOOD)
    api.pods.append(bundle.Workload(service_account="orders"))
    _run(api)
    api.policies["read"]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    outcome = _run(api)
    assert outcome.bundles_written == ("orders",)
    assert yaml.safe_load(api.config_maps["dbgov-policy-orders"]["data"]["policy.yaml"]) == {"policies": []}


def test_bundle_nothing_needs_is_deleted(api: FakeApi) -> None:
    # No policy names the account and no enrolled pod runs as it: the bundle does not linger.
    api.add_policy("read", GOOD)
    _run(api)
    api.policies["read"]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    outcome = _run(api)
    assert outcome.bundles_deleted == ("dbgov-policy-orders",)
    assert api.config_maps == {}
    assert _run(api).bundles_deleted == ()


def test_signed_bundle_is_current_until_changed_and_resigned_above_its_generation(api: FakeApi) -> None:
    signer = signing.generate()
    api.add_policy("read", GOOD)
    api.service_accounts["orders"] = "uid-orders"
    reconcile.reconcile_namespace(api, namespace="apps", config=CONFIG, now=NOW, emit=_quiet, signer=signer)
    body = api.config_maps["dbgov-policy-orders"]
    assert set(body["data"]) == {"policy.yaml", "policy.yaml.sig", "policy.db.yaml", "policy.db.yaml.sig"}
    assert body["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "ServiceAccount", "name": "orders", "uid": "uid-orders"}
    ]
    first = bundle_signature.parse(body["data"]["policy.yaml.sig"]).generation
    later = NOW + datetime.timedelta(hours=1)
    again = reconcile.reconcile_namespace(
        api, namespace="apps", config=CONFIG, now=later, emit=_quiet, signer=signer
    )
    assert again.bundles_written == ()
    # A namespace user's edit (content, or a signature moved from another file) is rewritten,
    # signed above the old generation even when the clock went back.
    original = body["data"]["policy.yaml"]
    body["data"]["policy.yaml"] = body["data"]["policy.yaml"].replace("block", "allow")
    earlier = NOW - datetime.timedelta(days=1)
    fixed = reconcile.reconcile_namespace(
        api, namespace="apps", config=CONFIG, now=earlier, emit=_quiet, signer=signer
    )
    assert fixed.bundles_written == ("orders",)
    data = api.config_maps["dbgov-policy-orders"]["data"]
    assert data["policy.yaml"] == original
    assert bundle_signature.parse(data["policy.yaml.sig"]).generation == first + 1
    data["policy.yaml.sig"] = data["policy.db.yaml.sig"]
    assert reconcile.reconcile_namespace(
        api, namespace="apps", config=CONFIG, now=NOW, emit=_quiet, signer=signer
    ).bundles_written == ("orders",)


def _quiet(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    return None


def test_pod_selector_follows_pods(api: FakeApi) -> None:
    api.add_policy("agents", {**GOOD, "subjects": {"podSelector": {"matchLabels": {"team": "ai"}}}})
    assert _run(api).bundles_written == ()
    api.pods.append(bundle.Workload(service_account="agent", labels={"team": "ai"}))
    assert _run(api).bundles_written == ("agent",)
    assert api.policies["agents"]["status"]["workloads"] == [
        {"kind": "ServiceAccount", "name": "agent", "serviceAccount": "agent"}
    ]


def test_a_service_account_that_does_not_exist_gets_no_bundle_until_it_does(api: FakeApi) -> None:
    del api.service_accounts["orders"]
    api.add_policy("read", GOOD)
    assert _run(api).bundles_written == ()
    assert api.config_maps == {}
    assert api.policies["read"]["status"]["boundWorkloads"] == 0
    api.service_accounts["orders"] = "uid-new"
    assert _run(api).bundles_written == ("orders",)
    assert api.config_maps["dbgov-policy-orders"]["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "ServiceAccount", "name": "orders", "uid": "uid-new"}
    ]
    assert api.policies["read"]["status"]["boundWorkloads"] == 1


def test_a_bundle_collected_with_its_service_account_is_never_written_again(api: FakeApi) -> None:
    api.add_policy("read", GOOD)
    api.pods.append(bundle.Workload(service_account="orders"))  # even while a pod still runs as it
    _run(api)
    del api.service_accounts["orders"]
    del api.config_maps["dbgov-policy-orders"]  # the garbage collector
    api.policies["read"]["spec"] = {**GOOD, "default": "approve"}  # a later policy edit
    api.policies["read"]["metadata"]["generation"] = 2
    assert _run(api).bundles_written == ()
    assert _run(api).bundles_written == ()  # and a restart
    assert api.config_maps == {}


def test_an_ownerless_bundle_of_a_gone_service_account_is_deleted(api: FakeApi) -> None:
    # Left by an earlier operator, which wrote bundles for names that did not exist.
    api.add_policy("read", GOOD)
    _run(api)
    api.config_maps["dbgov-policy-orders"]["metadata"].pop("ownerReferences")
    del api.service_accounts["orders"]
    assert _run(api).bundles_deleted == ("dbgov-policy-orders",)
    assert api.config_maps == {}


# One bundle that cannot be written holds back none of the others (issue 12, F2).


class RefusingApi(FakeApi):
    """Refuses the write of one bundle with the API server's 422 (or a transient 500)."""

    def __init__(self, refused: str, status: int) -> None:
        super().__init__()
        self.refused, self.status = refused, status

    def write_bundle(self, desired: ConfigMap, *, existing: Mapping[str, Any] | None) -> None:
        if desired["metadata"]["name"] == self.refused:
            err = ApiException(status=self.status, reason="Invalid")
            err.body = '{"message": "ConfigMap is invalid: metadata.name: Too long"}'
            raise err
        super().write_bundle(desired, existing=existing)


def _bind(api: FakeApi, accounts: list[str]) -> None:
    api.add_policy("p", {**GOOD, "subjects": {"serviceAccounts": accounts}})
    api.service_accounts = {a: f"uid-{a}" for a in accounts}


def test_a_refused_bundle_is_reported_and_the_others_are_written() -> None:
    api = RefusingApi("dbgov-policy-agent", 422)
    _bind(api, ["agent", "orders", "reports"])
    outcome = _run(api)  # permanent: reported, not raised (no retry loop)
    assert set(api.config_maps) == {"dbgov-policy-orders", "dbgov-policy-reports"}
    assert outcome.bundles_failed == {"agent": "ConfigMap is invalid: metadata.name: Too long"}
    status = api.policies["p"]["status"]
    assert [w["name"] for w in status["workloads"]] == ["orders", "reports"]  # never claims agent's
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert "ServiceAccount agent could not be written" in ready["message"]
    assert "Too long" in ready["message"]


def test_a_transient_failure_writes_the_others_then_fails_for_a_retry() -> None:
    api = RefusingApi("dbgov-policy-agent", 500)
    _bind(api, ["agent", "orders"])
    with pytest.raises(reconcile.BundleWriteFailed) as caught:
        _run(api)
    assert set(api.config_maps) == {"dbgov-policy-orders"}
    assert caught.value.outcome.bundles_failed.keys() == {"agent"}
    assert [w["name"] for w in api.policies["p"]["status"]["workloads"]] == ["orders"]
