"""The operator's renderings of a group's children (pure functions, no API server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from weft.api.transfergroup import TransferGroupSpec
from weft.operator import children

LEGACY = json.loads((Path(__file__).parent / "data" / "legacy_statefulsets.json").read_text())


@pytest.mark.parametrize("case", sorted(LEGACY))
def test_a_legacy_template_renders_the_statefulset_byte_for_byte_as_before(case: str) -> None:
    """Captured before pod templates existed: an operator upgrade must not roll existing pods."""
    stored: dict[str, Any] = LEGACY[case]
    spec = TransferGroupSpec.model_validate(stored["spec"])
    rendered = children.stateful_set("g", "ns", "uid-1", spec, "abc123", replicas=2)
    assert json.dumps(rendered) == json.dumps(stored["statefulSet"])
