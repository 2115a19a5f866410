"""weft.nixl: NIXL 1.5's Python API over weft's fabric, for NIXL's clients.

    import weft.nixl
    weft.nixl.install()          # `import nixl` now gives this package
    from nixl._api import nixl_agent, nixl_agent_config

or ``WEFT_NIXL=1`` with ``import weft.nixl.auto`` at start-up (see `weft.nixl.auto`). The
agent is a weft `Agent`: signed metadata, authenticated data path, deadlines, and transfers
that end "ERR" when their peer dies.
"""

from weft.nixl import _api, _bindings
from weft.nixl._api import (
    DEFAULT_COMM_PORT,
    nixl_agent,
    nixl_agent_config,
    nixl_backend_handle,
    nixl_prepped_dlist_handle,
    nixl_thread_sync_t,
    nixl_xfer_handle,
)
from weft.nixl.install import install

__all__ = [
    "DEFAULT_COMM_PORT",
    "_api",
    "_bindings",
    "install",
    "nixl_agent",
    "nixl_agent_config",
    "nixl_backend_handle",
    "nixl_prepped_dlist_handle",
    "nixl_thread_sync_t",
    "nixl_xfer_handle",
]
