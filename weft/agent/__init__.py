"""weft.agent: the node agent daemon (`weft agent`), one user of the engine SDK (`weft.engine`)."""

from weft.agent.daemon import EXIT_ETCD_UNREACHABLE, EXIT_FAILED, EXIT_OK, load_agent_settings, run_agent
from weft.engine.experts import ExpertSource, publish_experts

__all__ = [
    "EXIT_ETCD_UNREACHABLE",
    "EXIT_FAILED",
    "EXIT_OK",
    "ExpertSource",
    "load_agent_settings",
    "publish_experts",
    "run_agent",
]
