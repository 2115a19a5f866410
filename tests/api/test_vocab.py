"""The shared vocabulary: one declaration per enum, the strings the wire and the CRD carry."""

from __future__ import annotations

import json

import pytest

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
