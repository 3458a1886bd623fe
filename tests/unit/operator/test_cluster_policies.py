"""ClusterDatabaseAccessPolicy as data: its subjects, which namespaces it selects, how it joins a
namespace's bundles (a component like any other: the strictest answer wins, its name decides
nothing), its aggregated status, its webhook, and its CRD kept in step with the namespaced one."""

import datetime
import pathlib
from typing import Any

import pytest
import yaml

from dbgov_operator import (
    bundle,
    cluster_policies,
    credentials,
    grants,
    kubeapi,
    minting,
    reconcile,
    settings,
    webhook,
)
from dbgov_policy import compile as policy_compile
from dbgov_policy import model
from dbgov_sidecar import policies

NO_DDL: dict[str, Any] = {"name": "no-ddl", "verdict": "block", "statements": ["ddl", "dcl"]}
BASELINE: dict[str, Any] = {
    "subjects": {"namespaceSelector": {"matchLabels": {"env": "prod"}}},
    "default": "allow",
    "rules": [NO_DDL],
}
EVERYTHING: dict[str, Any] = {
    "subjects": {"serviceAccounts": ["orders"]},
    "databaseRef": {"name": "orders-db"},
    "default": "allow",
    "rules": [{"name": "anything", "verdict": "allow"}],
}
REPO = pathlib.Path(__file__).resolve().parents[3]


def _cluster(name: str, spec: dict[str, Any]) -> bundle.Policy:
    return bundle.Policy(name=bundle.cluster_component(name), spec=spec, valid=True)


def _decide(text: str, sql: str) -> tuple[str, str | None]:
    loaded = policies.build(policy_compile.load_text(text, source="policy.yaml"))
    decision = loaded.decide(sql, loaded.new_context())
    return decision.verdict, decision.rule


# -- subjects and namespaces ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "paths"),
    [
        (None, ["subjects"]),
        ({}, ["subjects.namespaceSelector"]),
        ({"serviceAccounts": ["orders"]}, ["subjects.namespaceSelector"]),
        ({"namespaceSelector": {"matchLabel": {"env": "prod"}}}, ["subjects.namespaceSelector.matchLabel"]),
        (
            {"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "Is"}]}},
            ["subjects.namespaceSelector.matchExpressions[0].operator"],
        ),
        ({"namespaceSelector": {}, "namespaces": ["prod"]}, ["subjects.namespaces"]),
    ],
)
def test_cluster_subjects_problems_carry_their_paths(raw: Any, paths: list[str]) -> None:
    spec = {} if raw is None else {"subjects": raw}
    assert [p.path for p in bundle.subjects(spec, cluster=True)[1]] == paths


def test_a_namespaced_policy_may_not_select_namespaces() -> None:
    spec = {"subjects": {"serviceAccounts": ["orders"], "namespaceSelector": {}}}
    assert [p.path for p in bundle.subjects(spec)[1]] == ["subjects.namespaceSelector"]


def test_naming_no_workload_binds_every_service_account_there() -> None:
    found, problems = bundle.subjects(BASELINE, cluster=True)
    assert not problems and found.every
    named, _ = bundle.subjects(
        {"subjects": {"namespaceSelector": {}, "serviceAccounts": ["a"]}}, cluster=True
    )
    assert not named.every and named.service_accounts == {"a"}


@pytest.mark.parametrize(
    ("selector", "labels", "selected"),
    [
        ({"matchLabels": {"env": "prod"}}, {"env": "prod", "team": "x"}, True),
        ({"matchLabels": {"env": "prod"}}, {"env": "dev"}, False),
        ({"matchLabels": {"env": "prod"}}, {}, False),
        ({}, {}, True),
        (
            {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "stage"]}]},
            {"env": "stage"},
            True,
        ),
        ({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}, {"env": "prod"}, False),
    ],
)
def test_namespace_selector_matching(
    selector: dict[str, Any], labels: dict[str, str], selected: bool
) -> None:
    spec = {"subjects": {"namespaceSelector": selector}}
    assert bundle.selects_namespace(spec, labels) is selected


def test_unreadable_subjects_select_no_namespace() -> None:
    assert not bundle.selects_namespace({"subjects": {"namespaceSelectr": {}}}, {"env": "prod"})
    assert not bundle.selects_namespace({}, {})


def test_matching_namespaces_and_selecting_policies() -> None:
    namespaces = {"shop": {"env": "prod"}, "lab": {"env": "dev"}, "bare": {}}
    assert cluster_policies.matching_namespaces(BASELINE, namespaces) == {"shop"}
    objects = [_object("baseline", BASELINE), _object("gone", BASELINE, deleting=True)]
    assert [p.name for p in cluster_policies.selecting(objects, {"env": "prod"})] == ["baseline"]
    assert cluster_policies.selecting(objects, {"env": "dev"}) == []


# -- bundle.plan with cluster components -------------------------------------------------------


def test_a_baseline_joins_the_bundle_and_an_allow_everything_policy_cannot_override_it() -> None:
    plan = bundle.plan(
        [bundle.Policy(name="aaa-allow-everything", spec=EVERYTHING, valid=True)],
        [],
        prefix="p-",
        cluster=[_cluster("zz-baseline", BASELINE)],
    )
    (only,) = plan.bundles
    assert only.policies == ("aaa-allow-everything", "cluster:zz-baseline")
    assert plan.bound == {"aaa-allow-everything": ("orders",), "cluster:zz-baseline": ("orders",)}
    for key in ("policy.yaml", "policy.orders-db.yaml"):  # no databaseRef: every database's file
        assert _decide(only.files[key], "DROP TABLE shop.orders") == ("block", "cluster:zz-baseline/no-ddl")
        assert _decide(only.files[key], "GRANT SELECT ON shop.orders TO PUBLIC")[0] == "block"
        assert _decide(only.files[key], "SELECT 1")[0] == "allow"
    shipped = yaml.safe_load(only.files["policy.yaml"])["policies"]
    assert "subjects" not in shipped[1]["spec"]  # the namespaceSelector is the operator's


def test_name_order_never_decides() -> None:
    for name in ("aaa", "zzz"):
        plan = bundle.plan(
            [bundle.Policy(name="mmm", spec=EVERYTHING, valid=True)],
            [],
            prefix="p-",
            cluster=[_cluster(name, BASELINE)],
        )
        assert _decide(plan.bundles[0].files["policy.yaml"], "DROP TABLE t")[0] == "block"


def test_a_baseline_adds_no_service_account_of_its_own() -> None:
    named = {**BASELINE, "subjects": {"namespaceSelector": {}, "serviceAccounts": ["payments"]}}
    plan = bundle.plan([], [], prefix="p-", cluster=[_cluster("b", named), _cluster("all", BASELINE)])
    assert plan.bundles == ()
    assert plan.bound == {"cluster:b": (), "cluster:all": ()}


def test_a_baseline_with_service_accounts_or_pod_selector_binds_only_those() -> None:
    pods = [
        bundle.Workload(service_account="agent", labels={"team": "ai"}),
        bundle.Workload(service_account="web"),
    ]
    agents = {
        **BASELINE,
        "subjects": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"team": "ai"}}},
    }
    plan = bundle.plan(
        [bundle.Policy(name="app", spec=EVERYTHING, valid=True)],
        pods,
        prefix="p-",
        cluster=[_cluster("agents", agents)],
    )
    by_account = {b.service_account: b.policies for b in plan.bundles}
    assert by_account == {"agent": ("cluster:agents",), "orders": ("app",), "web": ()}


def test_a_composition_that_does_not_compile_is_reported_on_the_baseline_too() -> None:
    def issuer(audience: str) -> dict[str, Any]:
        one = {"issuer": "https://idp.example", "audiences": [audience], "algorithms": ["RS256"]}
        return {"jwt": {"issuers": [{**one, "jwksUri": "https://idp.example/keys"}]}}

    plan = bundle.plan(
        [bundle.Policy(name="app", spec={**EVERYTHING, "authentication": issuer("one")}, valid=True)],
        [],
        prefix="p-",
        cluster=[_cluster("baseline", {**BASELINE, "authentication": issuer("two")})],
    )
    (only,) = plan.bundles
    assert only.problems
    # fail closed, the baseline beside the refusal (a conflict with the namespace's policy
    # must not take the baseline out of what the sidecar enforces)
    assert f"from: {bundle.REFUSING}, cluster:baseline\n" in only.files["policy.yaml"]
    assert set(plan.problems) == {"app", "cluster:baseline"}
    assert "with cluster:baseline" in plan.problems["app"][0].message
    assert "(cluster:baseline with app)" in plan.problems["cluster:baseline"][0].message


# -- status across namespaces ------------------------------------------------------------------


def _object(
    name: str, spec: dict[str, Any], *, deleting: bool = False, status: Any = None
) -> kubeapi.PolicyObject:
    body = {"metadata": {"name": name, "generation": 3}, "spec": spec, "status": status or {}}
    return kubeapi.PolicyObject(
        name=name, generation=3, spec=spec, status=status or {}, deleting=deleting, body=body
    )


def _outcome(bound: dict[str, tuple[str, ...]]) -> reconcile.Outcome:
    return reconcile.Outcome(bundles_written=(), statuses_written=(), cluster_bound=bound)


def test_status_lists_every_namespace_and_workload_it_is_in() -> None:
    tracker = cluster_policies.Tracker()
    tracker.record("shop", selecting=["baseline"], outcome=_outcome({"baseline": ("orders",)}))
    tracker.record("pay", selecting=["baseline"], outcome=_outcome({"baseline": ("api", "worker")}))
    status = cluster_policies.status(_object("baseline", BASELINE), found=tracker.found("baseline"), now="T")
    assert status["observedGeneration"] == 3
    assert status["namespaces"] == ["pay", "shop"]
    assert status["boundWorkloads"] == 3
    assert {(w["namespace"], w["name"]) for w in status["workloads"]} == {
        ("pay", "api"),
        ("pay", "worker"),
        ("shop", "orders"),
    }
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("True", "BundlesCurrent")
    assert "shop/orders" in ready["message"]
    # The namespace's label goes: the policy is no longer there.
    tracker.record("shop", selecting=[], outcome=_outcome({}))
    assert tracker.namespaces("baseline") == {"pay"}
    assert tracker.policies_in("shop") == set()


def test_an_invalid_cluster_policy_reports_its_problems_with_paths() -> None:
    broken = {**BASELINE, "rules": [{"name": "r", "verdict": "allow", "tabels": ["t"]}]}
    status = cluster_policies.status(_object("broken", broken), found={}, now="T")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["PolicyValid"]["status"] == "False"
    assert "spec.rules[0].tabels" in conditions["PolicyValid"]["message"]
    assert conditions["Ready"]["status"] == "False"


def test_a_composition_problem_names_its_namespace() -> None:
    found = {
        "shop": cluster_policies.InNamespace(
            bound=("orders",), composition=(policy_compile.Problem(path="", message="does not compile"),)
        )
    }
    status = cluster_policies.status(_object("baseline", BASELINE), found=found, now="T")
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "CompositionInvalid")
    assert "in namespace shop: does not compile" in ready["message"]


def test_a_status_written_by_a_parallel_reconcile_is_not_mistaken_for_current() -> None:
    tracker = cluster_policies.Tracker()
    old: dict[str, Any] = {"observedGeneration": 3, "namespaces": []}
    first = {"observedGeneration": 3, "namespaces": ["a"]}
    with tracker.lock:
        assert tracker.needs_write("b", first, old)
        tracker.written("b", first)
        # A second reconcile read the policy before the first write: its desired status equals
        # the stale one it read, but not the one now stored.
        assert tracker.needs_write("b", old, old)
        assert not tracker.needs_write("b", first, old)


# -- webhook and CRD ---------------------------------------------------------------------------


def test_the_webhook_configuration_validates_cluster_policies(tmp_path: pathlib.Path) -> None:
    config = settings.Settings(
        namespace="dbgov",
        webhook=settings.WebhookSettings(cert_dir=str(tmp_path), listen_addr="127.0.0.1", port=0),
    )
    hooks = webhook.validating_webhooks(
        config, client_config={"url": "https://127.0.0.1:1/x", "caBundle": "Y2E="}
    )
    (hook,) = [h for h in hooks if h["name"] == webhook.CLUSTER_POLICY_VALIDATION_ID]
    (rule,) = hook["rules"]
    assert rule["resources"] == ["clusterdatabaseaccesspolicies"] and rule["scope"] == "Cluster"
    assert rule["operations"] == ["CREATE", "UPDATE"]
    assert hook["clientConfig"]["url"].endswith("/" + webhook.CLUSTER_POLICY_VALIDATION_ID)
    assert hook["failurePolicy"] == "Fail"


def _crd(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "crds" / name).read_text())
    return loaded


def test_the_cluster_crd_keeps_the_namespaced_spec_plus_a_namespace_selector() -> None:
    namespaced = _crd("dbgov.io_databaseaccesspolicies.yaml")["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"
    ]
    cluster_crd = _crd("dbgov.io_clusterdatabaseaccesspolicies.yaml")
    assert cluster_crd["spec"]["scope"] == "Cluster"
    assert cluster_crd["spec"]["names"]["shortNames"] == ["cdap"]
    cluster = cluster_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    ours, theirs = dict(cluster["properties"]["spec"]), dict(namespaced["properties"]["spec"])
    assert ours.get("x-kubernetes-preserve-unknown-fields") is True  # the webhook reports unknown fields
    assert "required" not in ours  # every problem comes from the webhook, in one answer
    ours_props, theirs_props = dict(ours["properties"]), dict(theirs["properties"])
    subjects = dict(ours_props.pop("subjects")["properties"])
    assert set(subjects.pop("namespaceSelector")["properties"]) == {"matchLabels", "matchExpressions"}
    assert subjects == theirs_props.pop("subjects")["properties"]
    assert (
        ours_props.pop("databaseRef")["x-kubernetes-validations"]
        == theirs_props.pop("databaseRef")["x-kubernetes-validations"]
    )
    assert ours_props == theirs_props
    status = cluster["properties"]["status"]["properties"]
    assert status["workloads"]["x-kubernetes-list-map-keys"] == ["kind", "namespace", "name"]
    assert status["conditions"] == namespaced["properties"]["status"]["properties"]["conditions"]
    columns = [c["name"] for c in cluster_crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[0] == "Ready"


# -- minting: a baseline's blocks reach the minted grants -------------------------------------

MINT_CATALOG = grants.Catalog(
    schemas=("public", "shop"),
    tables=(
        grants.Table(schema="shop", name="orders", columns=("id", "qty")),
        grants.Table(schema="shop", name="secrets", columns=("id", "token")),
        grants.Table(schema="shop", name="customers", columns=("id", "email")),
    ),
)
NS, DB = "shop", "shop/orders-db"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
KEY = "k" * 32
LOCKDOWN: dict[str, Any] = {
    "subjects": {"namespaceSelector": {"matchLabels": {"env": "prod"}}},
    "default": "allow",
    "rules": [NO_DDL, {"name": "no-secrets", "verdict": "block", "tables": ["shop.secrets"]}],
    "masks": [{"table": "shop.customers", "column": "email", "strategy": "redact"}],
}


def _privileges(found: grants.GroupGrants) -> set[str]:
    return {str(p) for p in found.privileges}


def _mint_pod(uid: str = "u1", sa: str = "orders", **labels: str) -> minting.Pod:
    return minting.Pod(name=f"pod-{uid}", uid=uid, service_account=sa, labels=labels)


def test_the_baselines_of_a_namespace_are_the_cluster_policies_selecting_it() -> None:
    objects = [_object("lockdown", LOCKDOWN), _object("gone", LOCKDOWN, deleting=True)]
    assert [p.name for p in minting.baselines(objects, {"env": "prod"})] == ["cluster:lockdown"]
    assert minting.baselines(objects, {"env": "dev"}) == []


def test_a_namespace_policy_under_a_baseline_is_its_own_group() -> None:
    app = minting.Policy(name="app", spec=EVERYTHING)
    baseline = minting.Policy(name="cluster:lockdown", spec=LOCKDOWN)
    (found,) = minting.effective([app], [baseline], _mint_pod())
    assert (found.name, found.restricted_by) == ("app+cluster:lockdown", (baseline,))
    assert minting.effective([app], [], _mint_pod()) == [app]
    only_agents = minting.Policy(
        name="cluster:agents",
        spec={
            **LOCKDOWN,
            "subjects": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"team": "ai"}}},
        },
    )
    assert minting.effective([app], [only_agents], _mint_pod()) == [app]
    assert minting.effective([app], [only_agents], _mint_pod(team="ai"))[0].name == "app+cluster:agents"


def test_a_table_the_baseline_blocks_gets_no_privilege_whatever_the_namespace_allows() -> None:
    app = minting.Policy(name="app", spec=EVERYTHING)
    alone, failed = minting.compile_groups([app], MINT_CATALOG, namespace=NS, database=DB, mask_key=KEY)
    assert failed == {}
    assert "SELECT on table shop.secrets" in _privileges(alone["app"].grants)
    assert "CREATE on schema shop" in _privileges(alone["app"].grants)
    (under,) = minting.effective([app], [minting.Policy(name="cluster:lockdown", spec=LOCKDOWN)], _mint_pod())
    groups, failed = minting.compile_groups([under], MINT_CATALOG, namespace=NS, database=DB, mask_key=KEY)
    assert failed == {}
    held = _privileges(groups[under.name].grants)
    assert not [p for p in held if "shop.secrets" in p]
    assert "CREATE on schema shop" not in held  # ddl blocked
    assert not [p for p in held if p.startswith(("REFERENCES", "TRIGGER"))]
    assert {"SELECT on table shop.orders", "INSERT on table shop.orders"} <= held
    # The baseline's mask: email is never granted raw, and is read through a masking view.
    assert "SELECT on column shop.customers(id)" in held
    assert "SELECT on column shop.customers(email)" not in held
    assert "SELECT on table shop.customers" not in held
    (view,) = groups[under.name].grants.views
    assert view.source == model.QualifiedName(schema="shop", name="customers")


def test_the_minted_login_joins_the_restricted_group_only() -> None:
    app = minting.Policy(name="app", spec=EVERYTHING)
    baseline = minting.Policy(name="cluster:lockdown", spec=LOCKDOWN)
    pod = _mint_pod()
    candidates = minting.effective([app], [baseline], pod)
    groups, _ = minting.compile_groups(candidates, MINT_CATALOG, namespace=NS, database=DB, mask_key=KEY)
    desired = minting.desired_state(
        namespace=NS,
        database=DB,
        policies=[app],
        groups=groups,
        pods=[pod],
        actual=credentials.Actual(roles=()),
        now=NOW,
        presenting=pod,
        cluster=[baseline],
    )
    (login,) = desired.logins
    assert login.policies == ("app+cluster:lockdown",)
    assert [g.policy for g in desired.groups] == ["app+cluster:lockdown"]


def test_an_invalid_baseline_leaves_the_pod_without_a_group_rather_than_unrestricted() -> None:
    app = minting.Policy(name="app", spec=EVERYTHING)
    broken = minting.Policy(name="cluster:broken", spec={**LOCKDOWN, "default": "permit"})
    pod = _mint_pod()
    candidates = minting.effective([app], [broken], pod)
    groups, failed = minting.compile_groups(candidates, MINT_CATALOG, namespace=NS, database=DB, mask_key=KEY)
    assert set(failed) == {"app+cluster:broken"} and groups == {}
    desired = minting.desired_state(
        namespace=NS,
        database=DB,
        policies=[app],
        groups=groups,
        pods=[pod],
        actual=credentials.Actual(roles=()),
        now=NOW,
        presenting=pod,
        cluster=[broken],
    )
    assert desired.logins == () and desired.groups == ()
