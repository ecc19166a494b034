"""Hypothesis: hundreds of malformed LLMDeployments, each refused by the CRD and by the operator, naming the field."""

from __future__ import annotations

import collections

import pytest
from bad_manifests import BASE, Case, bad_manifests, base, crd_errors, every_field_fault, valid_manifests
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError

from stratus_operator.handlers.handle_reconcile_llmdeployment import invalid_message
from stratus_operator.spec import LLMDeployment

pytestmark = pytest.mark.unit
EXAMPLES = 400


def operator_message(manifest: dict[str, object]) -> str | None:
    """What the operator writes into status (the Ready condition's message), or None when it accepts it."""
    try:
        LLMDeployment.from_body(manifest)  # as the reconcile reads it
    except ValidationError as exc:
        return invalid_message(exc)
    return None


def test_the_base_and_its_valid_variations_pass_both() -> None:
    assert crd_errors(base()) == [] and operator_message(base()) is None
    assert crd_errors(BASE) == [] and operator_message(BASE) is None

    @settings(max_examples=30, deadline=None)
    @given(valid_manifests())
    def check(m: dict[str, object]) -> None:
        assert crd_errors(m) == [] and operator_message(m) is None  # type: ignore[arg-type]

    check()


def check_refused(case: Case) -> None:
    crd = crd_errors(case.manifest)
    assert crd, f"the CRD accepts a {case.kind}: {case.manifest['spec']}"
    assert any(case.field in e for e in crd), f"{case.kind}: CRD errors do not name {case.field!r}: {crd}"
    message = operator_message(case.manifest)
    assert message is not None, f"the operator accepts a {case.kind}: {case.manifest['spec']}"
    assert case.field in message, f"{case.kind}: the operator's message does not name {case.field!r}: {message}"


def test_every_field_path_refuses_its_faults() -> None:
    seen: collections.Counter[str] = collections.Counter()
    for case in every_field_fault():
        check_refused(case)
        seen[case.kind] += 1
    print("\nevery field path, one fault per kind:", dict(seen), "total:", sum(seen.values()))
    assert sum(seen.values()) >= 200


def test_malformed_manifests_are_refused_naming_the_field() -> None:
    seen: collections.Counter[str] = collections.Counter()
    distinct: set[str] = set()

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(bad_manifests())
    def check(case: Case) -> None:
        check_refused(case)
        seen[case.kind] += 1
        distinct.add(repr(case.manifest))

    check()
    print("\nmalformed manifests refused by CRD and operator:", dict(seen), "distinct:", len(distinct))
    assert len(distinct) >= 200
    assert len(seen) == 8, seen  # every kind of fault was tried
