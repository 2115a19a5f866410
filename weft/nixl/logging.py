"""``nixl.logging``: NIXL's clients call ``get_logger(name)``; here it is the stdlib's logger.

Unlike NIXL's module, nothing is configured at import (no handler, no level from
``NIXL_LOG_LEVEL``): the application owns logging configuration.
"""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    """The logger of `name` (NIXL's signature)."""
    return logging.getLogger(name)
