"""The README's Python examples import only public names (in their package's `__all__`)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
IMPORT = re.compile(r"^from (weft[\w.]*) import ([\w, ]+)$", re.MULTILINE)


def _imports() -> list[tuple[str, str]]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    return [
        (mod, name.strip())
        for block in blocks
        for mod, names in IMPORT.findall(block)
        for name in names.split(",")
    ]


def test_the_readme_has_python_examples() -> None:
    assert len(_imports()) >= 5


def test_readme_examples_import_only_public_names() -> None:
    private = []
    for mod, name in _imports():
        module = importlib.import_module(mod)
        if mod.count(".") > 1 or name not in getattr(module, "__all__", ()):
            private.append(f"from {mod} import {name}")
    assert not private, private
