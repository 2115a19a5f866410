"""The import contracts in `.importlinter` hold for the code, and the private-module rule bites.

`make lint` runs lint-imports too; running it here as well means a plain `pytest` catches an
import that crosses a layer, reaches into another package's private module or pulls the test
kit into the runtime. The second half builds a throw-away package with such an import and
checks that the very contract weft declares reports it: a rule that can never fail proves
nothing.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / ".importlinter"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PRIVATE_SECTION = "importlinter:contract:private-modules"


def _lint_imports(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def _read_config() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    assert parser.read(CONFIG) == [str(CONFIG)]
    return parser


def test_every_contract_is_kept() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout


def test_the_rules_are_declared() -> None:
    config = _read_config()
    kinds = {
        section.removeprefix("importlinter:contract:"): config[section]["type"]
        for section in config.sections()
        if section.startswith("importlinter:contract:")
    }
    assert kinds["layers"] == "layers"
    assert kinds["runtime-without-kit"] == "forbidden"
    assert kinds["private-modules"] == "private_modules"
    assert kinds["adapters"] == "forbidden"
    # every package with modules of its own has its inner order declared
    inner = {name.removesuffix("-layers") for name, kind in kinds.items() if name.endswith("-layers")}
    assert {"fabric", "membership", "kvstore", "engine", "planner", "operator", "testing"} <= inner
    # the main order names every top-level module of weft, none optional
    main = config["importlinter:contract:layers"]
    assert main["exhaustive"].strip() == "true"
    assert "(" not in main["layers"]


def _toy_package(root: Path, app_source: str) -> None:
    """toy.store owns a private module, _disk; toy.app is outside toy.store."""
    files = {
        "toy/__init__.py": "",
        "toy/store/__init__.py": "",
        "toy/store/_disk.py": "BLOCK = 4096\n",
        "toy/store/api.py": "from toy.store import _disk\n\nBLOCK = _disk.BLOCK\n",
        "toy/app.py": app_source,
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _toy_config(root: Path) -> None:
    """weft's own private-modules contract, pointed at the toy package (its ignores dropped)."""
    contract = dict(_read_config()[PRIVATE_SECTION])
    contract.pop("ignore_imports", None)
    contract["packages_with_private_modules"] = "toy"
    toy = configparser.ConfigParser()
    toy["importlinter"] = {"root_package": "toy"}
    toy[PRIVATE_SECTION] = contract
    with (root / ".importlinter").open("w") as out:
        toy.write(out)


def test_private_module_rule_allows_its_own_package(tmp_path: Path) -> None:
    _toy_package(tmp_path, "from toy.store import api\n\nBLOCK = api.BLOCK\n")
    _toy_config(tmp_path)
    result = _lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_private_module_rule_reports_an_import_from_outside(tmp_path: Path) -> None:
    _toy_package(tmp_path, "from toy.store import _disk\n\nBLOCK = _disk.BLOCK\n")
    _toy_config(tmp_path)
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 kept, 1 broken" in result.stdout
    assert "toy.app -> toy.store._disk" in result.stdout
    # the import inside the owning package is not reported
    assert "toy.store.api ->" not in result.stdout
