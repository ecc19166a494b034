"""Valid objects for the harness's tests to break one field at a time."""

from __future__ import annotations

import copy
from typing import Any


def deployment(name: str = "web", **pod: Any) -> dict[str, Any]:
    """A valid Deployment; keyword arguments replace fields of its pod spec."""
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "nginx:1.27",
                                            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
    spec.update(copy.deepcopy(pod))
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}}


def pod(name: str = "p", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"containers": [{"name": "c", "image": "nginx:1.27"}]}
    body.update(copy.deepcopy(spec))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": body}
