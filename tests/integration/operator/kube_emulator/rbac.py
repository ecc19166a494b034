"""Authentication by bearer token and RBAC authorization from the (Cluster)Roles and bindings in the store.

The harness's own tokens (`ADMIN_TOKENS`: the kubeconfig `write_kubeconfig` writes, the HTTP tests' default)
are an administrator (system:masters); a token registered with `Emulator.add_user` acts as that user and is held
to the roles bound to it, as the operator's ServiceAccount is on a real cluster; any other token is refused with
401 Unauthorized before anything else, as a real API server's authentication refuses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .keys import CLUSTERROLEBINDINGS, CLUSTERROLES, ROLEBINDINGS, ROLES, Key


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ("system:authenticated",)

    @property
    def admin(self) -> bool:
        return "system:masters" in self.groups


ADMIN = User("emulator-admin", ("system:masters", "system:authenticated"))
# The tokens the harness itself uses (operator_harness.write_kubeconfig, the HTTP tests' default).
ADMIN_TOKENS = ("emulator-token", "admin")


def service_account(namespace: str, name: str) -> User:
    return User(f"system:serviceaccount:{namespace}:{name}",
                ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"))


def _rule_allows(rule: dict[str, Any], verb: str, group: str, resource: str, name: str) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and verb not in verbs:
        return False
    groups = rule.get("apiGroups") or []
    if "*" not in groups and group not in groups:
        return False
    resources = rule.get("resources") or []
    base = resource.split("/", 1)[0]
    if "*" not in resources and resource not in resources and f"{base}/*" not in resources:
        return False
    names = rule.get("resourceNames") or []
    return not names or name in names


def _subject_matches(subject: dict[str, Any], user: User) -> bool:
    kind = subject.get("kind")
    if kind == "User":
        return bool(subject.get("name") == user.name)
    if kind == "Group":
        return subject.get("name") in user.groups
    if kind == "ServiceAccount":
        return user.name == f"system:serviceaccount:{subject.get('namespace')}:{subject.get('name')}"
    return False


Reader = Callable[[Key, str | None], Iterable[dict[str, Any]]]


def allowed(read_all: Reader, user: User, verb: str, key: Key, subresource: str | None, namespace: str | None,
            name: str) -> bool:
    """Whether RBAC lets `user` do `verb` on the resource (namespace None: cluster scope)."""
    if user.admin:
        return True
    resource = f"{key[2]}/{subresource}" if subresource else key[2]

    def role_rules(ref: dict[str, Any], binding_namespace: str | None) -> list[dict[str, Any]]:
        if ref.get("kind") == "ClusterRole":
            roles = [r for r in read_all(CLUSTERROLES, None) if r["metadata"]["name"] == ref.get("name")]
        else:
            roles = [r for r in read_all(ROLES, binding_namespace)
                     if r["metadata"]["name"] == ref.get("name")]
        return [rule for r in roles for rule in r.get("rules") or []]

    for binding in read_all(CLUSTERROLEBINDINGS, None):
        if any(_subject_matches(s, user) for s in binding.get("subjects") or []) and any(
                _rule_allows(rule, verb, key[0], resource, name) for rule in role_rules(binding["roleRef"], None)):
            return True
    if namespace is not None:
        for binding in read_all(ROLEBINDINGS, namespace):
            if any(_subject_matches(s, user) for s in binding.get("subjects") or []):
                rules = role_rules(binding["roleRef"], namespace)
                if any(_rule_allows(rule, verb, key[0], resource, name) for rule in rules):
                    return True
    return False


def denial(user: User, verb: str, key: Key, subresource: str | None, namespace: str | None) -> str:
    resource = f"{key[2]}/{subresource}" if subresource else key[2]
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return f'User "{user.name}" cannot {verb} resource "{resource}" in API group "{key[0]}" {scope}'
