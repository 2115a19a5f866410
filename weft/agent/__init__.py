"""weft.agent: the node agent daemon (`weft agent`): fabric, membership, health and metrics."""

from weft.agent.daemon import EXIT_ETCD_UNREACHABLE, EXIT_FAILED, EXIT_OK, load_agent_settings, run_agent

__all__ = ["EXIT_ETCD_UNREACHABLE", "EXIT_FAILED", "EXIT_OK", "load_agent_settings", "run_agent"]
