"""The pure planner, in stages: the compression Jobs (`jobs`), the topology (`topology`), the status (`status`).

No I/O and no executor: the plan holds logical references that `render` (Kubernetes objects) and
`local.runner` (processes) bind to their own world.
"""

from stratus_operator.planner.jobs import (
    CompressionJobPlan,
    CompressionResult,
    ResultParseError,
    parse_summary,
    plan_jobs,
)
from stratus_operator.planner.status import (
    Assessment,
    ConditionState,
    Endpoints,
    assess,
    build_status,
    status_without_times,
)
from stratus_operator.planner.topology import (
    Artifact,
    ModelRef,
    Plan,
    RouterPlan,
    ServerPlan,
    Source,
    Tier,
    VariantPlan,
    plan,
)

__all__ = [
    "Artifact",
    "Assessment",
    "CompressionJobPlan",
    "CompressionResult",
    "ConditionState",
    "Endpoints",
    "ModelRef",
    "Plan",
    "ResultParseError",
    "RouterPlan",
    "ServerPlan",
    "Source",
    "Tier",
    "VariantPlan",
    "assess",
    "build_status",
    "parse_summary",
    "plan",
    "plan_jobs",
    "status_without_times",
]
