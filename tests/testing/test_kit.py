"""weft.testing is a kit: importing it starts and loads nothing, and the runtime never uses it.

The import checks run in a fresh interpreter: this test session has already loaded the kit
(the etcd fixtures use it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import grimp
import pytest

import weft.testing
from weft.testing import controlplane, etcd

ROOT = Path(__file__).resolve().parent.parent.parent
RUNTIME = ("operator", "agent", "planner", "membership", "kvstore", "ep", "fabric", "api")


def _fresh(script: str) -> Any:
    """Run `script` in a new interpreter with weft importable; return what it printed as JSON."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    )
    return json.loads(result.stdout)


def test_import_loads_no_submodule_and_starts_nothing() -> None:
    seen = _fresh(
        """
        import json, os, sys, threading
        import weft
        modules, threads = set(sys.modules), threading.active_count()
        import weft.testing
        children = []
        for task in os.listdir("/proc/self/task"):
            path = f"/proc/self/task/{task}/children"
            if os.path.exists(path):
                children += open(path).read().split()
        print(json.dumps({
            "loaded": sorted(set(sys.modules) - modules),
            "threads": threading.active_count() - threads,
            "children": children,
        }))
        """
    )
    assert seen == {"loaded": ["weft.testing"], "threads": 0, "children": []}


def test_names_resolve_on_first_use() -> None:
    seen = _fresh(
        """
        import json, sys
        import weft.testing as kit
        steps = [sorted(m for m in sys.modules if m.startswith("weft.testing."))]
        kit.EtcdServer
        steps.append(sorted(m for m in sys.modules if m.startswith("weft.testing.")))
        kit.ControlPlane
        steps.append(sorted(m for m in sys.modules if m.startswith("weft.testing.")))
        print(json.dumps(steps))
        """
    )
    assert seen == [
        [],
        ["weft.testing.etcd"],
        ["weft.testing.controlplane", "weft.testing.etcd"],
    ]


@pytest.mark.parametrize("name", weft.testing.__all__)
def test_every_exported_name_is_its_module_object(name: str) -> None:
    source = controlplane if name == "ControlPlane" else etcd
    assert getattr(weft.testing, name) is getattr(source, name)
    assert name in dir(weft.testing)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'EtcdCluster'"):
        weft.testing.EtcdCluster  # noqa: B018


def test_runtime_packages_never_import_the_kit() -> None:
    graph = grimp.build_graph("weft", cache_dir=None)
    chains = {
        package: graph.find_shortest_chains(f"weft.{package}", "weft.testing", as_packages=True)
        for package in RUNTIME
    }
    assert chains == {package: set() for package in RUNTIME}
    # and the check sees imports of the kit where they exist
    assert graph.find_shortest_chains("weft.demo", "weft.testing", as_packages=True)
