"""Parameters of the fabric's storage backends, as NIXL's clients spell them.

LMCache passes NIXL's OBJ backend parameters through ``extra_config.nixl_backend_params``
and NIXL clients pass them to ``create_backend("OBJ", params)``; both reach `ObjParams`, the
one parser of them (`weft.fabric.backends.obj`, `weft.kvstore`). NIXL passes every value
as a string; the model takes strings or typed values alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pydantic


class ObjParams(pydantic.BaseModel):
    """``nixl_backend_params`` of the OBJ backend (the S3 API)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    bucket: Annotated[str, pydantic.Field(min_length=1, max_length=255)]
    access_key: pydantic.SecretStr | None = None
    """None: the S3 client's default credential chain (environment, files, instance role)."""
    secret_key: pydantic.SecretStr | None = None
    region: Annotated[str, pydantic.Field(max_length=64)] | None = None
    endpoint_override: Annotated[str, pydantic.Field(max_length=2048)] | None = None
    """URL of an S3-compatible store (MinIO, Ceph, a local test server); None: AWS."""
    scheme: Literal["http", "https"] | None = None
    """For an `endpoint_override` given as a bare host[:port]."""
    ca_bundle: str | None = None
    prefix: Annotated[str, pydantic.Field(max_length=512)] = ""
    """Object names start with it (several stores can share a bucket)."""
    session_token: pydantic.SecretStr | None = None
    """Temporary credentials' token (NIXL's ``session_token``)."""
    use_virtual_addressing: bool = False
    """NIXL's spelling of virtual-hosted-style requests (bucket in the host name)."""
    req_checksum: Literal["supported", "required"] | None = None
    """NIXL's request-checksum mode; accepted and ignored: weft's KV store digests every chunk
    itself, and raw OBJ regions are the caller's bytes (S3 checks each PUT's MD5/CRC anyway)."""

    @property
    def endpoint_url(self) -> str | None:
        e = self.endpoint_override
        if e is None or "://" in e:
            return e
        return f"{self.scheme or 'https'}://{e}"

    @pydantic.model_validator(mode="before")
    @classmethod
    def _endpoint_spellings(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "endpoint" in data and "endpoint_override" not in data:
            data = {("endpoint_override" if k == "endpoint" else k): v for k, v in data.items()}
        return data

    @pydantic.model_validator(mode="after")
    def _keys_pair(self) -> ObjParams:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("access_key and secret_key go together")
        return self
