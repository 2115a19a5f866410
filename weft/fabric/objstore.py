"""The S3 client of the fabric's `obj` backend and the KV store's OBJ tier: the only module
that imports obstore.

Chosen by measurement (`bench/s3_clients.py`, DEVELOPMENT.md): against the same S3-API server,
obstore (Rust's object_store) spent 2.2 ms of client CPU per MB on 256 KiB objects where
boto3 spent 7-8 (a quarter), moved those objects 1.6-2x faster, releases the GIL for the whole
request, and brings what the tier needs built in: retries with exponential backoff and
jitter, multipart uploads with parallel parts, parallel ranged reads, endpoint overrides
(path-style requests, plain HTTP when the endpoint says so).

Errors come out typed: a missing object is None (a miss), everything else `StorageError`
with the operation, the object and the cause.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from typing import Any

import obstore
from obstore.store import S3Store

from weft.api.storage import ObjParams
from weft.fabric.errors import StorageError


class S3Client:
    """One bucket (under a prefix) through obstore.

    Args:
        bucket, access_key, secret_key, region, endpoint: where and who; an endpoint that
            starts with ``http://`` allows plain HTTP (local and test servers).
        ca_bundle: PEM file of the CA that signed the endpoint's certificate.
        prefix: object names start with it.
        timeout_s: deadline of one request (retries have their own, `retry_timeout_s`).
        retries: attempts after the first, with exponential backoff from 100 ms, capped at
            2 s, with jitter.
        part_size: objects larger than this go up in parts (multipart), `concurrency` at once.
    """

    def __init__(
        self,
        bucket: str,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        endpoint: str | None = None,
        ca_bundle: str | None = None,
        prefix: str = "",
        timeout_s: float = 30.0,
        retries: int = 5,
        retry_timeout_s: float = 60.0,
        part_size: int = 16 << 20,
        concurrency: int = 8,
        session_token: str | None = None,
        virtual_hosted: bool = False,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.part_size = part_size
        self.concurrency = concurrency
        config: dict[str, Any] = {}
        if access_key is not None and secret_key is not None:
            config.update(access_key_id=access_key, secret_access_key=secret_key)
            if session_token:
                config["session_token"] = session_token
        if region:
            config["region"] = region
        elif endpoint:
            config["region"] = "us-east-1"  # S3-compatible stores ignore it; SigV4 needs one
        if endpoint:
            config.update(endpoint=endpoint, virtual_hosted_style_request=virtual_hosted)
        client: Any = {
            "timeout": datetime.timedelta(seconds=timeout_s),
            "connect_timeout": datetime.timedelta(seconds=min(timeout_s, 5.0)),
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
        }
        if ca_bundle:
            client["root_certificate"] = ca_bundle
        retry: Any = {
            "max_retries": retries,
            "retry_timeout": datetime.timedelta(seconds=retry_timeout_s),
            "backoff": {
                "init_backoff": datetime.timedelta(milliseconds=100),
                "max_backoff": datetime.timedelta(seconds=2),
                "base": 2.0,
            },
        }
        try:
            self._store = S3Store(bucket, client_options=client, retry_config=retry, **config)
        except Exception as exc:  # obstore raises its own types for bad settings
            raise StorageError(f"S3 bucket {bucket!r}: {exc}") from None

    @classmethod
    def from_params(cls, p: ObjParams, *, timeout_s: float = 30.0) -> S3Client:
        """The client NIXL-style OBJ parameters describe (`weft.api.storage.ObjParams`)."""
        secret = p.secret_key.get_secret_value() if p.secret_key else None
        return cls(
            p.bucket,
            access_key=p.access_key.get_secret_value() if p.access_key else None,
            secret_key=secret,
            region=p.region,
            endpoint=p.endpoint_url,
            ca_bundle=p.ca_bundle,
            prefix=p.prefix,
            timeout_s=timeout_s,
            session_token=p.session_token.get_secret_value() if p.session_token else None,
            virtual_hosted=p.use_virtual_addressing,
        )

    def _name(self, name: str) -> str:
        return self.prefix + name

    def _fail(self, op: str, name: str, exc: Exception, key: str | None = None) -> StorageError:
        text = " ".join(str(exc).split()) or type(exc).__name__
        code = re.search(r"<Code>([^<]{1,64})</Code>", text)  # S3's own word for it, if it said one
        text = re.sub(r"<\?xml.*", "", text).strip()
        why = f"{code.group(1)}: {text[:300]}" if code else text[:300]
        url = f"s3://{self.bucket}/{self._name(name)}"
        of = f" (key {key!r})" if key is not None else ""
        return StorageError(f"S3 {op} of {url}{of}: {why}", key=key, path=url)

    def check_bucket(self) -> None:
        """Fail now, not at the first put, when the bucket is missing or refuses us."""
        try:  # a listing, not a HEAD: a HEAD says 404 alike for a missing key and bucket
            next(iter(obstore.list(self._store, self.prefix or None, chunk_size=1)), None)
        except Exception as exc:
            raise self._fail("listing", "", exc) from None

    def put(self, name: str, body: Any, *, multipart: bool = True, key: str | None = None) -> None:
        """Store `body` (a buffer) whole: a single PUT, or multipart above `part_size` when
        `multipart`. Either way the object appears complete or not at all; a multipart
        upload that fails part-way may leave its parts behind (obstore cannot abort it),
        which a single PUT never does. `key` is named in errors."""
        try:
            obstore.put(
                self._store,
                self._name(name),
                body,
                chunk_size=self.part_size,
                max_concurrency=self.concurrency,
                use_multipart=None if multipart else False,
            )
        except Exception as exc:
            raise self._fail("put", name, exc, key) from None

    def get(self, name: str, *, key: str | None = None) -> Any:
        """The object's bytes (a buffer, zero-copy from the client), or None if absent."""
        try:
            return obstore.get(self._store, self._name(name)).bytes()
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail("get", name, exc, key) from None

    def size(self, name: str, *, key: str | None = None) -> int | None:
        try:
            return int(obstore.head(self._store, self._name(name))["size"])
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail("head", name, exc, key) from None

    def get_range(self, name: str, start: int, length: int) -> Any:
        """One byte range of an object (a buffer), or None if it is gone."""
        try:
            return obstore.get_range(self._store, self._name(name), start=start, length=length)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail("ranged get", name, exc) from None

    def get_ranges(
        self, name: str, starts: Sequence[int], lengths: Sequence[int], *, key: str | None = None
    ) -> list[Any] | None:
        """Several byte ranges of one object, fetched in parallel; None if it is gone."""
        try:
            return list(
                obstore.get_ranges(self._store, self._name(name), starts=starts, lengths=lengths, coalesce=0)
            )
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail("ranged get", name, exc, key) from None

    def delete(self, name: str, *, key: str | None = None) -> None:
        try:
            obstore.delete(self._store, self._name(name))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._fail("delete", name, exc, key) from None
