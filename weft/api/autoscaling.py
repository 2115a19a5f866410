"""``spec.autoscaling`` of a TransferGroup: replicas follow the members' load.

Modelled on Kubernetes' HorizontalPodAutoscaler (autoscaling/v2) so that people who know one
know the other: a target per metric, ``desired = ceil(current * value / target)`` outside a
tolerance band, and a ``behavior`` whose stabilization windows and step limits damp the
flapping a raw recommendation would cause. HPA cannot do this itself: the figures are the
members' signed ``load/<name>`` records in the group's etcd, not a metrics API.

Per-field ranges are in the schema, so the API server refuses nonsense with the field named
(inclusive bounds only: pydantic writes exclusive ones the JSON Schema 2020 way, which the
API server's OpenAPI 3.0 refuses); the rule between fields (enabled needs a target) is
`problems`, which the operator reports.
"""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from pydantic.alias_generators import to_camel

__all__ = ["Autoscaling", "Behavior", "ScaleDown", "ScaleUp", "Targets", "problems"]

# an object's default in the schema: the API server then fills the defaults inside it too
_EMPTY: dict[str, Any] = {"default": {}}
WindowSeconds = Annotated[int, pydantic.Field(ge=0, le=3600)]
Step = Annotated[int, pydantic.Field(ge=1, le=4096)]


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Targets(_Model):
    """What one member should carry; the group is sized so each metric meets its target.

    Several targets: the largest recommendation wins (HPA's rule), so meeting one never
    breaks another."""

    queue_depth_per_member: Annotated[float, pydantic.Field(ge=0.01, le=1e6)] | None = pydantic.Field(
        None, description="mean requests waiting to start per member"
    )
    kv_cache_usage: Annotated[float, pydantic.Field(ge=0.01, le=1)] | None = pydantic.Field(
        None, description="mean fraction of the members' KV-cache blocks in use"
    )
    ttft_p90_ms: Annotated[float, pydantic.Field(ge=1, le=1e9)] | None = pydantic.Field(
        None, description="highest p90 time to first token across members, in ms (an SLA target)"
    )

    def configured(self) -> dict[str, float]:
        """The targets that are set, by their camelCase name (the name events and tests use)."""
        return {
            name: value
            for name, value in (
                ("queueDepthPerMember", self.queue_depth_per_member),
                ("kvCacheUsage", self.kv_cache_usage),
                ("ttftP90Ms", self.ttft_p90_ms),
            )
            if value is not None
        }


class ScaleUp(_Model):
    """How fast replicas may grow: HPA's defaults (no window, react at once), one step bounded."""

    stabilization_window_seconds: WindowSeconds = pydantic.Field(
        0, description="scale up to the lowest recommendation of this many seconds"
    )
    max_step: Step = pydantic.Field(4, description="pods added by one decision at most")


class ScaleDown(_Model):
    """How fast replicas may shrink: slowly (HPA waits 300 s), since every pod that goes is
    drained first and a pod brought back must join and load its experts again."""

    stabilization_window_seconds: WindowSeconds = pydantic.Field(
        300, description="scale down to the highest recommendation of this many seconds"
    )
    max_step: Step = pydantic.Field(1, description="pods removed by one decision at most")


class Behavior(_Model):
    scale_up: ScaleUp = pydantic.Field(
        default_factory=lambda: ScaleUp.model_validate({}), json_schema_extra=_EMPTY
    )
    scale_down: ScaleDown = pydantic.Field(
        default_factory=lambda: ScaleDown.model_validate({}), json_schema_extra=_EMPTY
    )
    tolerance: Annotated[float, pydantic.Field(ge=0, le=1)] = pydantic.Field(
        0.1, description="no change while every metric is within this fraction of its target"
    )


class Autoscaling(_Model):
    """Replicas from load, between the spec's floor (minReplicas and what roles and experts
    need) and ``spec.maxReplicas``. Written through the scale subresource, so ``kubectl
    scale`` and an HPA compose with it: a person's value is the next starting point."""

    enabled: bool = pydantic.Field(False, description="scale spec.replicas from the members' load")
    targets: Targets = pydantic.Field(
        default_factory=lambda: Targets.model_validate({}), json_schema_extra=_EMPTY
    )
    behavior: Behavior = pydantic.Field(
        default_factory=lambda: Behavior.model_validate({}), json_schema_extra=_EMPTY
    )


def problems(autoscaling: Autoscaling | None) -> list[str]:
    """Rules between the section's fields; each a sentence a user can act on."""
    if autoscaling is None or not autoscaling.enabled:
        return []
    if not autoscaling.targets.configured():
        return [
            "spec.autoscaling is enabled without a target: set spec.autoscaling.targets."
            "queueDepthPerMember, kvCacheUsage or ttftP90Ms"
        ]
    return []
