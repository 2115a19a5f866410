"""The shared vocabulary: one declaration per enum, the strings the wire and the CRD carry."""

from __future__ import annotations

import enum
import importlib
import json
import pkgutil

import pytest

import weft
from weft import api, fabric, kvstore, planner
from weft.api import agent_settings, errors, metadata, records, transfergroup, vocab


@pytest.mark.parametrize(
    ("enum", "values"),
    [
        (vocab.MemoryKind, ["DRAM", "VRAM", "FILE", "OBJ"]),
        (vocab.Op, ["WRITE", "READ"]),
        (vocab.TransferState, ["POSTED", "DONE", "ERROR"]),
        (vocab.Backend, ["local", "tcp", "ucx"]),
        (vocab.StorageBackend, ["POSIX", "GDS", "GDS_MT", "OBJ", "HF3FS"]),
        (vocab.BufferDevice, ["cpu", "cuda"]),
        (vocab.Role, ["prefill", "decode"]),
        (vocab.RolePolicy, ["ratio", "load"]),
        (vocab.MemberState, ["joining", "active", "draining"]),
        (
            vocab.EventKind,
            [
                "added",
                "updated",
                "removed",
                "leader",
                "fenced",
                "rejoined",
                "left",
                "etcd-lost",
                "etcd-back",
                "load",
                "plan",
                "drain",
            ],
        ),
    ],
)
def test_values_are_the_strings_on_the_wire(enum: type[vocab.enum.StrEnum], values: list[str]) -> None:
    assert [m.value for m in enum] == values
    assert all(m == m.value and json.dumps(m) == json.dumps(m.value) for m in enum)


def test_every_layer_names_the_same_classes() -> None:
    assert fabric.MemoryKind is vocab.MemoryKind and fabric.Backend is vocab.Backend
    assert fabric.Op is vocab.Op and fabric.TransferState is vocab.TransferState
    assert planner.Role is vocab.Role
    assert kvstore.NixlBackend is vocab.StorageBackend
    assert transfergroup.StorageBackend is vocab.StorageBackend
    assert transfergroup.RolePolicy is vocab.RolePolicy


def test_no_enum_is_declared_twice() -> None:
    """Every enum class in weft, imported module by module: no two share a value set, so a
    second declaration of a shared vocabulary cannot come back unnoticed."""
    declared: dict[frozenset[str], str] = {}
    for info in pkgutil.walk_packages(weft.__path__, "weft."):
        if info.name.startswith("weft.testing") or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, enum.Enum) and obj.__module__ == info.name:
                values = frozenset(str(m.value) for m in obj)
                where = f"{info.name}.{name}"
                assert values not in declared, f"{where} repeats {declared[values]}"
                declared[values] = where
    assert "weft.api.vocab.Backend" in declared.values()


def test_policy_defaults_agree_between_the_crd_the_agent_and_the_planner() -> None:
    roles = transfergroup.Roles.model_validate({})
    planning = agent_settings.PlanningSettings()
    ratio = planner.RatioPolicy()
    assert roles.ratio == planning.ratio == f"{ratio.prefill}:{ratio.decode}" == vocab.DEFAULT_RATIO
    assert roles.min_prefill == planning.min_prefill == ratio.min_prefill == vocab.DEFAULT_MIN_PREFILL
    assert roles.min_decode == planning.min_decode == ratio.min_decode == vocab.DEFAULT_MIN_DECODE
    assert set(roles.gpu_less_roles) == set(planning.gpu_less_roles) == set(ratio.gpu_less_roles)


def test_boundary_errors_are_in_the_one_tree() -> None:
    for cls in (metadata.MetadataDecodeError, metadata.MetadataAuthError, records.RecordError):
        assert issubclass(cls, errors.WeftError) and issubclass(cls, ValueError)
    assert issubclass(agent_settings.SettingsError, errors.ConfigError)
    assert issubclass(metadata.MetadataAuthError, errors.AuthenticationError)
    assert fabric.WeftError is errors.WeftError and fabric.ConfigError is errors.ConfigError
    assert api.METADATA_FORMAT == metadata.METADATA_FORMAT


def test_records_take_strings_and_carry_them_unchanged() -> None:
    caps = records.Capabilities(memory_kinds=["DRAM", "VRAM"], backends=["tcp"])
    assert caps.memory_kinds == [vocab.MemoryKind.DRAM, vocab.MemoryKind.VRAM]
    assert json.loads(caps.model_dump_json()) == {
        "gpus": 0,
        "memory_kinds": ["DRAM", "VRAM"],
        "backends": ["tcp"],
        "dram_bytes": 0,
        "vram_bytes": 0,
    }
