"""Several policies that bind one workload, composed so that none can loosen another.

A workload is often bound by more than one policy: a platform baseline, a security team's
block list, the application team's own policy. Concatenating their rules (first match wins)
would let whoever sorts first decide, so a namespace user could override a baseline with a
policy named ``aaa-...``. Composition never merges rules. Each policy (a *component*) judges
every statement on its own, exactly as it would alone (its first matching rule, else its
default, with its own guardrails), and the strictest answer wins: block > approve > mask >
allow. Name order never decides anything but which of two equally strict answers is reported.

What is not a per-statement verdict is combined explicitly:

- masks: the union; a column masked by several policies takes the strictest strategy
  (``STRATEGY_ORDER``), writable only if every policy masking it says so. Every deciding
  component's engine carries the union, so the rewrite of the winning decision masks all of it.
- guardrails judged per statement (requireWhere, deniedFunctions, allowedFunctions,
  allowedSettings) stay with their own component, which makes them a union (any policy's
  requireWhere or denied function refuses) and an intersection (a function or setting value
  is trusted only if every policy trusts it) without rewriting them; the row limits the proxy
  enforces take the smallest value.
- mode: the refusals of a dry-run component are reported (in the decision's reason), never
  enforced, while enforce components decide; when every component is dry-run, they decide
  together and the proxy runs in dry-run.
- end users: the proxy accepts a token from any issuer some policy declares (a namespace's own
  rules may use its own identity provider), but a policy's subject-scoped rules match only
  identities from issuers that policy may trust (``trusted_issuers``): its own, and those of
  the cluster baselines (``CLUSTER_PREFIX``); a cluster baseline trusts only cluster baselines'
  issuers. An issuer declared only by another namespaced policy is its author's to mint tokens
  for, so to every other policy its identities are no identity at all, exactly like a session
  without a token: a namespace user cannot satisfy a baseline's ``subjects`` with a token they
  signed themselves. A policy alone keeps whatever issuer the proxy trusted.

Pure: engines and decisions only, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from dbgov_policy import decide as verdicts
from dbgov_policy import engine, model

CLUSTER_PREFIX = "cluster:"
"""How a cluster baseline (ClusterDatabaseAccessPolicy) is named in a composition; the operator
names its components so (``dbgov_operator.bundle.CLUSTER_PREFIX``). A namespaced policy cannot
carry it: Kubernetes names cannot contain ':'."""

STRATEGY_ORDER: tuple[model.Strategy, ...] = ("null", "redact", "hash", "email", "partial")
"""Mask strategies, strictest first: ``null`` reveals nothing, ``redact`` the length, ``hash``
the length and which values are equal, ``email`` the domain, ``partial`` the last characters
(of two partial masks, the one keeping fewer characters is stricter)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Component:
    """One policy of a composition: its name (as audit events and statuses show it) and what
    it compiled to."""

    name: str
    policy: model.CompiledPolicy


class CompositionInvalid(ValueError):
    """Policies that compile alone but cannot be composed; ``problems`` are (policy, message)."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{name}: {message}" for name, message in self.problems))


def stricter_mask(a: model.Mask, b: model.Mask) -> model.Mask:
    """The mask of a column two policies mask: the stricter strategy, writable only if both are."""
    rank_a, rank_b = STRATEGY_ORDER.index(a.strategy), STRATEGY_ORDER.index(b.strategy)
    key_a, key_b = (rank_a, a.keep_last), (rank_b, b.keep_last)
    chosen = a if key_a <= key_b else b
    return dataclasses.replace(chosen, writable=a.writable and b.writable)


def union_masks(policies: Sequence[model.CompiledPolicy]) -> tuple[model.Mask, ...]:
    """Every column any policy masks, each with the strictest of its masks."""
    found: dict[tuple[model.QualifiedName, str], model.Mask] = {}
    for policy in policies:
        for m in policy.masks:
            key = (m.table, m.column)
            have = found.get(key)
            found[key] = m if have is None else stricter_mask(have, m)
    return tuple(found.values())


def _smallest(values: Sequence[int | None]) -> int | None:
    given = [v for v in values if v is not None]
    return min(given) if given else None


def union_guardrails(policies: Sequence[model.CompiledPolicy]) -> model.Guardrails:
    """The guardrails of a composition as one value, for what reads them outside the per-policy
    judgement (row limits the proxy enforces, reports): unions, minima and intersections."""
    if not policies:
        return model.Guardrails()
    allowed_functions = frozenset.intersection(*(p.guardrails.allowed_functions for p in policies))
    settings: dict[str, frozenset[str]] = {}
    for name in set.intersection(*(set(p.guardrails.allowed_settings) for p in policies)):
        settings[name] = frozenset.intersection(*(p.guardrails.allowed_settings[name] for p in policies))
    return model.Guardrails(
        require_where=frozenset().union(*(p.guardrails.require_where for p in policies)),
        max_rows_affected=_smallest([p.guardrails.max_rows_affected for p in policies]),
        max_rows_returned=_smallest([p.guardrails.max_rows_returned for p in policies]),
        denied_functions=frozenset().union(*(p.guardrails.denied_functions for p in policies)),
        allowed_functions=allowed_functions,
        allowed_settings=settings,
    )


def union_issuers(components: Sequence[Component]) -> tuple[model.JwtIssuer, ...]:
    """The token issuers any policy trusts; one issuer configured two ways is a problem (which
    audiences or keys would apply depends on which policy is read)."""
    found: dict[str, tuple[str, model.JwtIssuer]] = {}
    problems: list[tuple[str, str]] = []
    for component in components:
        for issuer in component.policy.jwt_issuers:
            have = found.get(issuer.issuer)
            if have is None:
                found[issuer.issuer] = (component.name, issuer)
            elif have[1] != issuer:
                problems.append(
                    (
                        component.name,
                        f"authentication.jwt issuer {issuer.issuer!r} is configured differently by "
                        f"policy {have[0]}: give it the same settings in both, or keep it in one",
                    )
                )
    if problems:
        raise CompositionInvalid(problems)
    return tuple(issuer for _, issuer in found.values())


def is_cluster(component: Component) -> bool:
    """Whether ``component`` is a cluster baseline (platform-owned) rather than a namespace's."""
    return component.name.startswith(CLUSTER_PREFIX)


def trusted_issuers(components: Sequence[Component]) -> tuple[frozenset[str], ...]:
    """Per component, the issuers whose identities its subject-scoped rules may match: the
    cluster baselines' issuers, and for a namespaced policy its own too; never an issuer that
    only another namespaced policy declares (its author holds the keys)."""
    platform = frozenset(i.issuer for c in components if is_cluster(c) for i in c.policy.jwt_issuers)
    return tuple(
        platform if is_cluster(c) else platform | {i.issuer for i in c.policy.jwt_issuers} for c in components
    )


def _trusting(component: Component, trusted: frozenset[str]) -> Component:
    """``component`` with every subject-scoped rule limited to identities of ``trusted``."""
    rules = tuple(
        r
        if r.subjects is None
        else dataclasses.replace(r, subjects=dataclasses.replace(r.subjects, trusted=trusted))
        for r in component.policy.rules
    )
    return dataclasses.replace(component, policy=dataclasses.replace(component.policy, rules=rules))


def untrusted_subjects(components: Sequence[Component]) -> tuple[tuple[str, str], ...]:
    """(policy, message) for every rule whose ``subjects.issuers`` names an issuer its policy may
    not trust in this composition: the rule never applies to it (reported, not refused: which
    issuers a policy may trust changes with the baselines, which its author does not control)."""
    if len(components) < 2:
        return ()
    found: list[tuple[str, str]] = []
    for component, trusted in zip(components, trusted_issuers(components), strict=True):
        whose = (
            "no cluster baseline" if is_cluster(component) else "neither this policy nor any cluster baseline"
        )
        for rule in component.policy.rules:
            named_issuers = () if rule.subjects is None else rule.subjects.issuers or ()
            found.extend(
                (
                    component.name,
                    f"rule {rule.name}: subjects.issuers names {issuer!r}, which {whose} declares "
                    "in authentication.jwt, so the rule never applies to its tokens in this composition; "
                    "declare the issuer there, or remove it from the rule",
                )
                for issuer in named_issuers
                if issuer not in trusted
            )
    return tuple(found)


def deciding(components: Sequence[Component]) -> tuple[bool, ...]:
    """Which components decide (the enforce ones; all of them when every one is dry-run)."""
    enforce = tuple(c.policy.mode == "enforce" for c in components)
    return enforce if any(enforce) else tuple(True for _ in components)


def summary(components: Sequence[Component]) -> model.CompiledPolicy:
    """What the composition is as one value: the mode it runs in, the masks it applies, its
    guardrails and issuers. Its rules are empty: only the components judge statements."""
    deciders = [c.policy for c, d in zip(components, deciding(components), strict=True) if d]
    keys = {c.policy.mask_key for c in components}
    return model.CompiledPolicy(
        mode="enforce" if any(c.policy.mode == "enforce" for c in components) else "dry-run",
        default="block",
        rules=(),
        guardrails=union_guardrails(deciders),
        masks=union_masks(deciders),
        mask_key=min(keys) if keys else "",
        jwt_issuers=union_issuers(components),
    )


def prepared(components: Sequence[Component]) -> tuple[Component, ...]:
    """The components as their engines judge: a deciding component with the union masks (its
    own rules, default and guardrails); a reporting (dry-run beside enforce) one as it is.
    Raises ``CompositionInvalid`` when the components cannot be composed."""
    if not components:
        raise CompositionInvalid([("", "a composition needs at least one policy")])
    names = [c.name for c in components]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CompositionInvalid([(n, "two policies of the composition have this name") for n in duplicates])
    whole = summary(components)
    if len(components) > 1:
        components = [_trusting(c, t) for c, t in zip(components, trusted_issuers(components), strict=True)]
    return tuple(
        dataclasses.replace(c, policy=dataclasses.replace(c.policy, masks=whole.masks)) if d else c
        for c, d in zip(components, deciding(components), strict=True)
    )


def named(component: str, decision: verdicts.Decision) -> verdicts.Decision:
    """``decision`` with its rule named after the policy that reached it (``policy/rule``);
    built-in and guardrail verdicts keep their names."""
    rule = decision.rule
    if rule is None or rule.startswith(("guardrail", "builtin")) or "/" in rule:
        return decision
    return dataclasses.replace(decision, rule=f"{component}/{rule}")


def combine(
    decisions: Sequence[verdicts.Decision],
    *,
    names: Sequence[str],
    deciders: Sequence[bool],
) -> verdicts.Decision:
    """The composed decision: the strictest of the deciding components' decisions (the first
    of equally strict ones is reported), its rule named after its policy; a reporting
    component's stricter verdict is added to the reason (audited, not enforced)."""
    best = -1
    for i, decision in enumerate(decisions):
        if deciders[i] and (
            best < 0 or model.STRICTNESS[decision.verdict] > model.STRICTNESS[decisions[best].verdict]
        ):
            best = i
    chosen = named(names[best], decisions[best])
    strictness = model.STRICTNESS[chosen.verdict]
    notes = [
        f"dry-run policy {names[i]} would {d.verdict} ({named(names[i], d).rule}: {d.reason})"
        for i, d in enumerate(decisions)
        if not deciders[i] and model.STRICTNESS[d.verdict] > strictness
    ]
    if notes:
        chosen = dataclasses.replace(chosen, reason=f"{chosen.reason}; {'; '.join(notes)}")
    return chosen


class Context:
    """The session state of a composition: one engine context per component. They share one
    ``Names`` (prepared statements and cursors are the server's, whichever policy judged them)
    and follow the session's ``search_path`` together."""

    __slots__ = ("names", "parts")

    def __init__(self, parts: Sequence[engine.SessionContext]) -> None:
        self.parts = tuple(parts)
        self.names = self.parts[0].names
        for part in self.parts:
            part.names = self.names

    @property
    def search_path(self) -> tuple[str, ...]:
        return self.parts[0].search_path

    @search_path.setter
    def search_path(self, path: tuple[str, ...]) -> None:
        for part in self.parts:
            part.search_path = path


MAX_COMBINED = 8192
"""Composed decisions kept per composition (cached component decisions combine to the same)."""


class Composed:
    """Decides query strings for a composition: each component with its own cached engine."""

    def __init__(
        self,
        components: Sequence[Component],
        *,
        cache_size: int = 8192,
        max_statement_size: int | None = None,
    ) -> None:
        # (engine imports compile, which imports this module: its constant is read at call time)
        size = engine.MAX_STATEMENT_SIZE if max_statement_size is None else max_statement_size
        self._given = tuple(components)
        self.components = prepared(components)
        self.policy = summary(components)
        """The composition as one value (mode, union masks, guardrails, issuers); no rules."""
        self.names = tuple(c.name for c in self.components)
        self.deciders = deciding(self.components)
        self.engines = tuple(
            engine.Engine(c.policy, cache_size=cache_size, max_statement_size=size) for c in self.components
        )
        self._combined: dict[tuple[int, ...], tuple[tuple[verdicts.Decision, ...], verdicts.Decision]] = {}

    def new_context(self, template: engine.SessionContext | None = None) -> Context:
        """A session context for this composition, like ``template`` (catalog maps, path)."""
        base = template if template is not None else engine.SessionContext()
        return Context(
            [
                engine.SessionContext(
                    search_path=base.search_path,
                    columns=base.columns,
                    inherits=base.inherits,
                    ancestors=base.ancestors,
                    names=base.names,
                )
                for _ in self.engines
            ]
        )

    def decide(self, sql: str, *, session: Context | None = None) -> verdicts.Decision:
        ctx = session if session is not None else self.new_context()
        found = tuple(
            eng.decide(sql, session=part) for eng, part in zip(self.engines, ctx.parts, strict=True)
        )
        return self._combine(found)

    def _combine(self, found: tuple[verdicts.Decision, ...]) -> verdicts.Decision:
        if any(d.rewritten is not None for d in found):
            return combine(found, names=self.names, deciders=self.deciders)
        key = tuple(map(id, found))
        memo = self._combined.get(key)
        if memo is not None and all(a is b for a, b in zip(memo[0], found, strict=True)):
            return memo[1]
        decision = combine(found, names=self.names, deciders=self.deciders)
        if len(self._combined) >= MAX_COMBINED:
            self._combined.clear()
        self._combined[key] = (found, decision)
        return decision

    def cached_shape(
        self, sql: str, *, session: Context | None = None
    ) -> tuple[str, verdicts.Decision] | None:
        """The shape key of ``sql`` and its one composed decision, when every component's cache
        decides every text of that shape alike; None otherwise (see ``Engine.cached_shape``)."""
        ctx = session if session is not None else self.new_context()
        found: list[verdicts.Decision] = []
        key = ""
        for eng, part in zip(self.engines, ctx.parts, strict=True):
            shape = eng.cached_shape(sql, session=part)
            if shape is None:
                return None
            key = shape[0]
            found.append(shape[1])
        return key, self._combine(tuple(found))

    def for_rules(self, keep: Callable[[model.Rule], bool]) -> Composed:
        """This composition with only the rules ``keep`` accepts in each component (the rules
        that apply to one end user); engines are new, with empty caches. ``keep`` sees the rules
        as composed (their ``subjects`` limited to the issuers their policy may trust)."""
        eng = self.engines[0]
        return Composed(
            [
                dataclasses.replace(
                    given,
                    policy=dataclasses.replace(
                        given.policy,
                        rules=tuple(
                            r
                            for r, judged in zip(given.policy.rules, c.policy.rules, strict=True)
                            if keep(judged)
                        ),
                    ),
                )
                for given, c in zip(self._originals(), self.components, strict=True)
            ],
            cache_size=eng.cache_size,
            max_statement_size=eng.max_statement_size,
        )

    def _originals(self) -> tuple[Component, ...]:
        return self._given
