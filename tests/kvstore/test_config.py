"""lmcache-config.yaml: the seed's examples load verbatim; broken variants fail at load, precisely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from weft.fabric.errors import ConfigError
from weft.kvstore import NixlBackend, load_lmcache_config

SEEDS = Path(__file__).parent / "seeds"

NESTED_OBJ = {
    "chunk_size": 256,
    "nixl_buffer_size": 1 << 30,
    "nixl_buffer_device": "cpu",
    "extra_config": {
        "enable_nixl_storage": True,
        "nixl_backend": "OBJ",
        "nixl_pool_size": 64,
        "nixl_backend_params": {"bucket": "kv", "endpoint_override": "http://127.0.0.1:9000"},
    },
}


def test_the_seed_posix_example_loads_verbatim() -> None:
    c = load_lmcache_config(SEEDS / "posix.yaml")
    assert (c.chunk_size, c.nixl_buffer_size, c.nixl_buffer_device) == (256, 1073741824, "cpu")
    x = c.extra_config
    assert (x.enable_nixl_storage, x.nixl_backend, x.nixl_pool_size, x.nixl_path) == (
        True,
        NixlBackend.POSIX,
        64,
        "/mnt/nixl/cache/",
    )


def test_the_seed_obj_example_loads_verbatim() -> None:
    c = load_lmcache_config(SEEDS / "obj.yaml")
    assert c.backend is NixlBackend.OBJ
    p = c.obj_params
    assert (p.bucket, p.region) == ("<your_bucket>", "<your_region>")
    assert p.access_key is not None and p.access_key.get_secret_value() == "<your_access_key>"
    assert "your_secret_key" not in repr(p)  # secrets stay out of logs


def test_the_nested_form_and_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = load_lmcache_config(NESTED_OBJ)
    assert c.obj_params.endpoint_override == "http://127.0.0.1:9000"
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(SEEDS / "posix.yaml"))
    assert load_lmcache_config().backend is NixlBackend.POSIX
    monkeypatch.delenv("LMCACHE_CONFIG_FILE")
    with pytest.raises(ConfigError, match="LMCACHE_CONFIG_FILE is not set"):
        load_lmcache_config()


def _posix(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "chunk_size": 256,
        "nixl_buffer_size": 1 << 30,
        "nixl_buffer_device": "cpu",
        "extra_config": {
            "enable_nixl_storage": True,
            "nixl_backend": "POSIX",
            "nixl_pool_size": 64,
            "nixl_path": "/x",
        },
    }
    extra = over.pop("extra", {})
    base.update(over)
    base["extra_config"] = {**base["extra_config"], **extra}
    return base


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_posix(nixl_buffer_device="cuda"), "nixl_buffer_device must be 'cpu' for the POSIX backend"),
        (
            _posix(
                extra={"nixl_backend": "OBJ", "nixl_backend_params": {"bucket": "b"}},
                nixl_buffer_device="cuda",
            ),
            "must be 'cpu' for the OBJ",
        ),
        (_posix(nixl_buffer_device="gpu"), "nixl_buffer_device: Input should be 'cpu' or 'cuda'"),
        (_posix(extra={"nixl_backend": "NVME"}), "extra_config.nixl_backend: Input should be"),
        (
            _posix(extra={"nixl_pool_size": 0}),
            "extra_config.nixl_pool_size: Input should be greater than or equal to 1",
        ),
        (_posix(chunk_size=0), "chunk_size: Input should be greater than or equal to 1"),
        (_posix(nixl_buffer_size="a lot"), "nixl_buffer_size: Input should be a valid integer"),
        (_posix(extra={"nixl_path": None}), "nixl_path is needed: the POSIX backend stores files"),
        (_posix(extra={"enable_nixl_storage": False}), "enable_nixl_storage is not true"),
        (_posix(extra={"nixl_backend": "OBJ"}), "nixl_backend_params (bucket, ...) is needed"),
        (
            _posix(extra={"nixl_backend": "OBJ", "nixl_backend_params": {"region": "r"}}),
            "bucket: Field required",
        ),
        (
            _posix(extra={"nixl_backend": "OBJ", "nixl_backend_params": {"bucket": "b", "access_key": "k"}}),
            "access_key and secret_key go together",
        ),
        (_posix(extra={"nixl_backend": "GDS"}), "the GDS backend needs kvikio"),
        (_posix(extra={"nixl_backend": "HF3FS"}), "the HF3FS backend needs a 3FS client"),
        ({"chunk_size": 256, "nixl_buffer_size": 1 << 30}, "extra_config: Field required"),
    ],
)
def test_broken_configs_fail_at_load_with_the_key_named(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_lmcache_config(config)
    assert message in str(info.value)


def test_cuda_is_checked_against_the_machine() -> None:
    import importlib.util

    from weft import fabric

    config = _posix(nixl_buffer_device="cuda", extra={"nixl_backend": "GDS_MT"})
    if not fabric.gpu_available():
        with pytest.raises(ConfigError, match="'cuda' but this machine has no usable GPU"):
            load_lmcache_config(config)
    elif importlib.util.find_spec("kvikio") is None:  # a GPU: then GDS_MT needs kvikio
        with pytest.raises(ConfigError, match="the GDS_MT backend needs kvikio"):
            load_lmcache_config(config)
    else:
        assert load_lmcache_config(config).nixl_buffer_device == "cuda"


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read LMCache config"):
        load_lmcache_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: [1,\n")
    with pytest.raises(ConfigError, match="not YAML"):
        load_lmcache_config(bad)
