"""Make ``import nixl`` give weft's NIXL: `install()` puts the shim into ``sys.modules``.

NIXL's clients import ``nixl._api`` (``nixl_agent``, ``nixl_agent_config``, ``nixlBind``),
``nixl._bindings`` and ``nixl.logging``; after `install()` those names are weft's modules and
``nixl`` itself is `weft.nixl`, so vLLM's NixlConnector, LMCache and Dynamo run unchanged.
Call it before the client imports nixl (a client that already holds the real module keeps it).
"""

from __future__ import annotations

import sys
import types

from weft.fabric import AgentConfig
from weft.nixl import _api, _bindings
from weft.nixl import logging as nixl_logging


def install(config: AgentConfig | None = None) -> types.ModuleType:
    """Register weft's NIXL as ``nixl``, ``nixl._api``, ``nixl._bindings``, ``nixl.logging``.

    Args:
        config: the weft settings every ``nixl_agent`` starts from (secret, listen and
            advertise hosts, timeouts; its backends are replaced by the agent's). None: read
            ``WEFT_SECRET`` / ``WEFT_SECRET_FILE``, ``WEFT_LISTEN_HOST``,
            ``WEFT_ADVERTISE_HOST`` when each agent starts.
    Returns:
        the module now imported as ``nixl``.
    """
    package = sys.modules["weft.nixl"]
    if config is not None:
        _api.set_base_config(config)
    sys.modules["nixl"] = package
    sys.modules["nixl._api"] = _api
    sys.modules["nixl._bindings"] = _bindings
    sys.modules["nixl.logging"] = nixl_logging
    return package
