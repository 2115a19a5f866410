"""The OBJ tier against a real S3-API server (moto's server mode on loopback)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.kvstore.contract import check_round_trip, pattern
from tests.s3_fixtures import S3Server, s3_client
from weft.fabric.errors import ConfigError, InvalidBufferError, StorageError
from weft.fabric.objstore import S3Client
from weft.kvstore import BatchError, KVStore
from weft.kvstore.obj import ObjTier, object_name

pytestmark = pytest.mark.integration
SEEDS = Path(__file__).parent / "seeds"


def config(server: S3Server, bucket: str, **params: Any) -> dict[str, Any]:
    return {
        "chunk_size": 256,
        "nixl_buffer_size": 1 << 30,
        "nixl_buffer_device": "cpu",
        "extra_config": {
            "enable_nixl_storage": True,
            "nixl_backend": "OBJ",
            "nixl_pool_size": 8,
            "nixl_backend_params": {
                "bucket": bucket,
                "access_key": server.access_key,
                "secret_key": server.secret_key,
                "region": server.region,
                "endpoint_override": server.endpoint,
                **params,
            },
        },
    }


@pytest.mark.parametrize("size", [0, 1, 4096, 256 << 10, (5 << 20) + 1, (40 << 20) + 7])
def test_round_trips_of_many_sizes(s3_server: S3Server, s3_bucket: str, size: int) -> None:
    """Every chunk goes up as one PUT; 40 MiB, read into a buffer that large, comes back as
    parallel ranges; the rest are one GET."""
    with KVStore.from_lmcache_config(config(s3_server, s3_bucket)) as kv:
        check_round_trip(kv, size)


def test_batches_overwrites_and_a_prefix(s3_server: S3Server, s3_bucket: str) -> None:
    with KVStore.from_lmcache_config(config(s3_server, s3_bucket, prefix="team-a/kv")) as kv:
        items = {f"k{i}": pattern(64 << 10, i) for i in range(48)}
        kv.put_many(items)
        got = kv.get_many([*items, "missing"])
        assert got[:-1] == [d.tobytes() for d in items.values()] and got[-1] is None
        intos = [np.zeros(64 << 10, np.uint8) for _ in items]
        assert kv.get_many(list(items), into=intos) == [True] * len(items)
        assert all(np.array_equal(b, d) for b, d in zip(intos, items.values(), strict=True))
        kv.put("k0", b"new")
        assert kv.get("k0") == b"new"
    listed = s3_client(s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert len(listed) == 48 and all(o["Key"].startswith("team-a/kv/") for o in listed)


def test_a_flipped_byte_at_rest_reads_as_a_miss(
    s3_server: S3Server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    s3 = s3_client(s3_server)
    with KVStore.from_lmcache_config(config(s3_server, s3_bucket)) as kv:
        kv.put("victim", pattern(100_000, 3))
        name = object_name("victim")
        body = bytearray(s3.get_object(Bucket=s3_bucket, Key=name)["Body"].read())
        body[50_000] ^= 0x40
        s3.put_object(Bucket=s3_bucket, Key=name, Body=bytes(body))
        with caplog.at_level(logging.WARNING, logger="weft.kvstore"):
            assert kv.get("victim") is None
        assert kv.corrupt_chunks == 1 and any("checksum mismatch" in r.message for r in caplog.records)
        s3.put_object(Bucket=s3_bucket, Key=object_name("short"), Body=b"WEFTKV")  # not a chunk
        assert kv.get("short") is None and kv.corrupt_chunks == 2


def test_the_seed_obj_example_through_the_endpoint_override(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed's file as published, its placeholders filled, one line added: the endpoint."""
    text = (SEEDS / "obj.yaml").read_text()
    for placeholder, value in {
        "<your_access_key>": s3_server.access_key,
        "<your_secret_key>": s3_server.secret_key,
        "<your_bucket>": s3_bucket,
        "<your_region>": s3_server.region,
    }.items():
        text = text.replace(placeholder, value)
    path = tmp_path / "lmcache-config.yaml"
    path.write_text(text + f"endpoint_override: {s3_server.endpoint}\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(path))
    with KVStore.from_lmcache_config() as kv:
        kv.put("seed-chunk", pattern(300_000, 9))
        assert kv.get("seed-chunk") == pattern(300_000, 9).tobytes()


def test_a_missing_bucket_is_refused_at_init(s3_server: S3Server) -> None:
    with pytest.raises(StorageError, match="s3://no-such-bucket-here/: NoSuchBucket"):
        KVStore.from_lmcache_config(config(s3_server, "no-such-bucket-here"))


def test_an_unreachable_endpoint_fails_typed_within_its_retry_deadline() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = S3Client(
        "b", access_key="k", secret_key="s", endpoint=f"http://127.0.0.1:{port}", retries=2, retry_timeout_s=3
    )
    t = time.monotonic()
    with pytest.raises(StorageError, match="S3 put of s3://b/"):
        client.put("x", b"data")
    assert time.monotonic() - t < 10


def test_obstore_missing_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "obstore" else real(n, *a))
    with pytest.raises(ConfigError, match="needs obstore"):
        KVStore.from_lmcache_config(config(S3Server("http://127.0.0.1:1"), "b"))


WRITER = """
import numpy as np
from weft.kvstore import KVStore
kv = KVStore.from_lmcache_config({cfg!r})
data = np.random.default_rng(5).integers(0, 256, 48 << 20, dtype=np.uint8)
print("ready", flush=True)
for i in range(10**6):
    data[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)
    kv.put("big", data)
"""


def _uploads(server: S3Server, bucket: str) -> list[Any]:
    """Multipart uploads begun and never completed nor aborted."""
    return list(s3_client(server).list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_a_writer_killed_mid_upload_leaves_the_old_chunk_or_none(s3_server: S3Server, s3_bucket: str) -> None:
    """A chunk appears whole or not at all: a kill leaves nothing half-written, and no
    incomplete multipart upload (a chunk goes up as one PUT)."""
    cfg = config(s3_server, s3_bucket)
    reference = pattern(48 << 20, 5).tobytes()
    for delay in (0.2, 0.7):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER.format(cfg=cfg)], stdout=subprocess.PIPE, env=dict(os.environ)
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        with KVStore.from_lmcache_config(cfg) as kv:
            got = kv.get("big")
            assert got is None or got[8:] == reference[8:]
            assert kv.corrupt_chunks == 0
        assert _uploads(s3_server, s3_bucket) == []


def test_a_put_failing_mid_body_leaves_the_old_copy_and_no_upload(
    s3_server: S3Server, s3_bucket: str
) -> None:
    """An injected failure: a deadline far too short for 48 MiB ends the request mid-body."""
    with KVStore.from_lmcache_config(config(s3_server, s3_bucket)) as kv:
        kv.put("chunk", b"the old copy")
    hasty = S3Client(
        s3_bucket,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        endpoint=s3_server.endpoint,
        timeout_s=0.05,
        retries=0,
    )
    tier = ObjTier(hasty, workers=2)
    try:
        with pytest.raises(StorageError, match=r"S3 put of s3://.*\.kv \(key 'chunk'\)") as failed:
            tier.put("chunk", memoryview(pattern(48 << 20, 1)))
        assert failed.value.key == "chunk"
        assert tier.put_many([("chunk", memoryview(pattern(48 << 20, 2))), ("small", memoryview(b"s"))])[0]
    finally:
        tier.close()
    assert _uploads(s3_server, s3_bucket) == []
    with KVStore.from_lmcache_config(config(s3_server, s3_bucket)) as kv:
        assert kv.get("chunk") == b"the old copy"


def test_typed_errors_per_key_and_a_corrupt_read_zeroes_into(s3_server: S3Server, s3_bucket: str) -> None:
    s3 = s3_client(s3_server)
    with KVStore.from_lmcache_config(config(s3_server, s3_bucket)) as kv:
        kv.put_many({0xABC: pattern(5000, 1), "ok": pattern(100, 2)})
        assert kv.get("abc") == pattern(5000, 1).tobytes()  # the int key in LMCache's hex form
        short, fine = np.full(10, 7, np.uint8), np.zeros(100, np.uint8)
        with pytest.raises(BatchError) as batch:
            kv.get_many([0xABC, "ok"], into=[short, fine])
        assert list(batch.value.errors) == ["abc"] and batch.value.results == [False, True]
        assert isinstance(batch.value.errors["abc"], InvalidBufferError) and (short == 7).all()
        assert np.array_equal(fine, pattern(100, 2))
        with pytest.raises(InvalidBufferError, match="read-only"):
            kv.get("ok", into=bytes(100))
        body = bytearray(s3.get_object(Bucket=s3_bucket, Key=object_name("ok"))["Body"].read())
        body[4096 + 50] ^= 1
        s3.put_object(Bucket=s3_bucket, Key=object_name("ok"), Body=bytes(body))
        into = np.full(100, 0x55, np.uint8)
        assert kv.get("ok", into=into) is False and not into.any()  # corrupt: zeroed
        into[:] = 0x55
        assert kv.get("absent", into=into) is False and (into == 0x55).all()  # no chunk: untouched
