"""LMCache's ``lmcache-config.yaml``, accepted unchanged, checked when it is loaded.

The keys and their meaning are LMCache's (seed: lmcache-nixl-storage-backend.txt):
``chunk_size`` (tokens per KV chunk), ``nixl_buffer_size`` (bytes of the staging buffer),
``nixl_buffer_device`` (``cpu`` or ``cuda``), and under ``extra_config``:
``enable_nixl_storage``, ``nixl_backend`` (GDS, GDS_MT, POSIX, HF3FS, OBJ), ``nixl_pool_size``
(descriptors / file handles opened at init), ``nixl_path`` (directory of the files) and
``nixl_backend_params`` (for OBJ: ``access_key``, ``secret_key``, ``bucket``, ``region`` and
``endpoint_override`` for S3-compatible stores).

Two spellings load the same: the nested YAML LMCache documents, and the flat text of the
seed as it is published, where the indentation under ``extra_config:`` and
``nixl_backend_params:`` was lost (those keys then sit at the top level next to an empty
``extra_config``). Keys LMCache has for its other features are kept and ignored here.

The seed's rules are enforced at load time, each with an error naming the key: POSIX, HF3FS
and OBJ stage in ``cpu`` memory; GDS and GDS_MT allow ``cpu`` or ``cuda``; ``cuda`` needs a
usable GPU; a backend whose client is not installed is refused by name.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import pydantic

from weft import fabric
from weft.api.storage import ObjParams
from weft.api.vocab import BufferDevice, StorageBackend
from weft.fabric.errors import ConfigError

CONFIG_ENV = "LMCACHE_CONFIG_FILE"
_EXTRA_KEYS = ("enable_nixl_storage", "nixl_backend", "nixl_pool_size", "nixl_path", "nixl_backend_params")
_OBJ_KEYS = (
    "access_key",
    "secret_key",
    "bucket",
    "region",
    "endpoint_override",
    "endpoint",
    "scheme",
    "ca_bundle",
    "prefix",
)


NixlBackend = StorageBackend
"""LMCache's name for the storage backends (``nixl_backend``): the same enum as the CRD's."""


CPU_ONLY = frozenset({NixlBackend.POSIX, NixlBackend.HF3FS, NixlBackend.OBJ})


class ExtraConfig(pydantic.BaseModel):
    """``extra_config``: the NIXL storage settings (other LMCache extras are kept, unused)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="allow")
    enable_nixl_storage: bool = False
    nixl_backend: NixlBackend
    nixl_pool_size: Annotated[int, pydantic.Field(ge=1, le=65536)] = 64
    nixl_path: str | None = None
    nixl_backend_params: dict[str, Any] | None = None


class LMCacheConfig(pydantic.BaseModel):
    """The parts of ``lmcache-config.yaml`` the KV store uses, checked as a whole."""

    model_config = pydantic.ConfigDict(frozen=True, extra="allow")
    chunk_size: Annotated[int, pydantic.Field(ge=1, le=1 << 20)] = 256
    """Tokens per chunk (LMCache's unit of KV cache)."""
    nixl_buffer_size: Annotated[int, pydantic.Field(ge=4096, le=1 << 40)]
    """Bytes of the staging buffer that every transfer to and from storage goes through."""
    nixl_buffer_device: BufferDevice = BufferDevice.CPU
    extra_config: ExtraConfig

    @pydantic.model_validator(mode="before")
    @classmethod
    def _seed_flattened(cls, data: Any) -> Any:
        """The published seed lost its indentation: fold top-level extra keys back in."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        extra = data.get("extra_config")
        if extra is None and any(k in data for k in _EXTRA_KEYS):
            extra = {k: data.pop(k) for k in _EXTRA_KEYS if k in data}
            params = extra.get("nixl_backend_params")
            if params is None and any(k in data for k in _OBJ_KEYS):
                extra["nixl_backend_params"] = {k: data.pop(k) for k in _OBJ_KEYS if k in data}
            data["extra_config"] = extra
        return data

    @pydantic.model_validator(mode="after")
    def _seed_rules(self) -> LMCacheConfig:
        x = self.extra_config
        if x.nixl_backend in CPU_ONLY and self.nixl_buffer_device is not BufferDevice.CPU:
            raise ValueError(
                f"nixl_buffer_device must be 'cpu' for the {x.nixl_backend.value} backend "
                "(only GDS and GDS_MT stage in 'cuda' memory)"
            )
        if x.nixl_backend is not NixlBackend.OBJ and not x.nixl_path:
            raise ValueError(
                f"extra_config.nixl_path is needed: the {x.nixl_backend.value} backend stores files"
            )
        if x.nixl_backend is NixlBackend.OBJ:
            if not x.nixl_backend_params:
                raise ValueError(
                    "extra_config.nixl_backend_params (bucket, ...) is needed for the OBJ backend"
                )
            ObjParams.model_validate(x.nixl_backend_params)  # raises with the field named
        return self

    @property
    def backend(self) -> NixlBackend:
        return self.extra_config.nixl_backend

    @property
    def obj_params(self) -> ObjParams:
        return ObjParams.model_validate(self.extra_config.nixl_backend_params or {})


def load_lmcache_config(source: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> LMCacheConfig:
    """Load and check an LMCache config: a path, a mapping, or None for ``$LMCACHE_CONFIG_FILE``.

    Raises:
        ConfigError: the file is missing or not YAML, a key is wrong (named in the message),
            a rule of the seed is broken, ``cuda`` is asked for without a usable GPU, NIXL
            storage is not enabled, or the backend's client is not installed.
    """
    where = "the config"
    if source is None:
        env = os.environ.get(CONFIG_ENV)
        if not env:
            raise ConfigError(f"no LMCache config given and ${CONFIG_ENV} is not set")
        source = env
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        path = Path(source)
        where = str(path)
        data = _read_yaml(path)
    try:
        config = LMCacheConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"{where}: {_describe(exc)}") from None
    if not config.extra_config.enable_nixl_storage:
        raise ConfigError(f"{where}: extra_config.enable_nixl_storage is not true: NIXL storage is off")
    if config.nixl_buffer_device is BufferDevice.CUDA and not fabric.gpu_available():
        raise ConfigError(
            f"{where}: nixl_buffer_device is 'cuda' but this machine has no usable GPU "
            "(CuPy and a CUDA device are needed); use 'cpu'"
        )
    _require_client(config.backend, where)
    return config


def _require_client(backend: NixlBackend, where: str) -> None:
    if backend in (NixlBackend.GDS, NixlBackend.GDS_MT) and importlib.util.find_spec("kvikio") is None:
        raise ConfigError(
            f"{where}: the {backend.value} backend needs kvikio (GPUDirect Storage), not installed"
        )
    if backend is NixlBackend.OBJ and importlib.util.find_spec("obstore") is None:
        raise ConfigError(f"{where}: the OBJ backend needs obstore (pip install obstore), not installed")
    if backend is NixlBackend.HF3FS:
        raise ConfigError(
            f"{where}: the HF3FS backend needs a 3FS client (hf3fs usrbio), not available to weft"
        )


def _read_yaml(path: Path) -> Any:
    from weft.api import agent_settings  # the one YAML reader (adapter for pyyaml)

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read LMCache config {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not YAML: not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not YAML: it holds NUL bytes (a binary file?)")
    try:
        return agent_settings.parse_yaml(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not YAML: {exc}") from None


def _describe(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "config"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
