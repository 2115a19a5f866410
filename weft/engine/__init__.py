"""weft.engine: the SDK an inference engine calls to be a member of a weft group.

Join from what the operator injected, register real memory, follow the plan::

    from weft.engine import Engine, RoleChange

    async def serve() -> None:
        engine = Engine.from_env()                  # WEFT_* and the mounted agent.yaml
        engine.agent.register(kv_cache, "kv-pool")  # peers WRITE KV blocks here

        async def switch(change: RoleChange) -> None:
            await finish_or_hand_off(change.old)    # then serve change.new
        engine.on_role_change(switch)               # acked only after this returns

        async with engine:                          # join; drain and leave on exit
            engine.load.set(queue_depth=len(waiting), running=len(running))
            ...

`SyncEngine` is the same for engines without an asyncio loop. The `weft agent` daemon is one
user of this SDK (with no handlers: the SDK's own behaviour).
"""

from weft.engine.changes import Change, ChangeState, DrainRequest, ExpertChange, RoleChange
from weft.engine.coordinator import PlanningConfig
from weft.engine.engine import CONFIG_ENV, Engine, load_settings, planning_config
from weft.engine.experts import ExpertSource, publish_experts
from weft.engine.load import LoadReport, LoadTracker
from weft.engine.sync import SyncEngine

__all__ = [
    "CONFIG_ENV",
    "Change",
    "ChangeState",
    "DrainRequest",
    "Engine",
    "ExpertChange",
    "ExpertSource",
    "LoadReport",
    "LoadTracker",
    "PlanningConfig",
    "RoleChange",
    "SyncEngine",
    "load_settings",
    "planning_config",
    "publish_experts",
]
