"""Opt-in by environment: importing this module installs weft's NIXL when ``WEFT_NIXL=1``.

Nothing in weft imports it. A user who cannot edit the client adds one line to the
interpreter's start (a ``sitecustomize.py`` on ``PYTHONPATH``, or the launcher)::

    import weft.nixl.auto  # noqa: F401  -- WEFT_NIXL=1 makes `import nixl` weft's

so the same image runs on NIXL or weft by flipping ``WEFT_NIXL``. No ``.pth`` file, no
import hook that rewrites imports: one explicit import, one variable.
"""

from __future__ import annotations

import os

from weft.nixl.install import install

ENV = "WEFT_NIXL"

if os.environ.get(ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
    install()
