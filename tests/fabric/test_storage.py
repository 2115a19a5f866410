"""FILE and OBJ memory through the fabric's own API: posix and obj storage backends.

A transfer with the agent's own FILE or OBJ region is an ordinary prepare/post/READ/WRITE:
same states, deadlines, typed errors and notifications. The OBJ tests run on a real S3-API
server (moto's server mode, `tests.s3_fixtures`).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.s3_fixtures import S3Server, s3_client
from weft.fabric import (
    Agent,
    AgentConfig,
    BackendUnavailableError,
    ConfigError,
    FileRegion,
    InvalidBufferError,
    InvalidDescriptorError,
    MemoryKind,
    ObjectRegion,
    Op,
    RegistrationError,
    StorageError,
    StorageInfo,
    TransferState,
    UnknownRegionError,
    _cuda,
)
from weft.fabric.backends import posix
from weft.fabric.storage import FileHandle

SECRET = b"storage-test-secret"


@pytest.fixture
def agent() -> Any:
    a = Agent("store", AgentConfig(secret=SECRET))
    a.add_backend("POSIX")
    yield a
    a.close()


def _random(n: int, seed: int = 1) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


# -- posix: FILE memory ---------------------------------------------------------------------


def test_raw_bytes_land_at_the_callers_offsets_with_no_format_of_ours(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "raw"
    data = agent.register(_random(3 * 4096))
    f = agent.register(FileRegion(path=path, offset=1000, length=1 << 20, create=True))
    assert f.kind is MemoryKind.FILE
    # three descriptors, out of order in the file, one of them next to another (one run)
    t = agent.prepare(
        Op.WRITE,
        data.descs([(0, 4096), (4096, 4096), (8192, 4096)]),
        agent.name,
        f.descs([(0, 4096), (4096, 4096), (20000, 4096)]),
    ).post()
    t.wait()
    raw = path.read_bytes()
    assert raw[1000 : 1000 + 8192] == data.buffer[:8192].tobytes()
    assert raw[21000 : 21000 + 4096] == data.buffer[8192:].tobytes()
    assert raw[:1000] == bytes(1000)  # nothing of ours before the region
    assert len(raw) == 21000 + 4096  # no header, no footer: the file ends where the data does


def test_read_back_through_a_descriptor_the_caller_opened(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "theirs"
    payload = _random(64 << 10, seed=7)
    path.write_bytes(payload.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        f = agent.register(FileRegion(fd=fd))
        into = agent.alloc(64 << 10)
        agent.read(into.descs(), agent.name, f.descs([(0, 64 << 10)])).wait()
        assert np.array_equal(into.buffer, payload)
        # the descriptor was opened read-only: a WRITE is refused at prepare, not at the syscall
        with pytest.raises(RegistrationError, match="read-only"):
            agent.prepare(Op.WRITE, into.descs([(0, 10)]), agent.name, f.descs([(0, 10)]))
        f.release()
        os.fstat(fd)  # the caller's descriptor stays open: weft closes only what it opened
    finally:
        os.close(fd)


@pytest.mark.parametrize("nbytes", [4096, 1 << 20, (16 << 20) + 12345])
def test_round_trips_small_inline_and_large_over_the_lanes(agent: Agent, tmp_path: Path, nbytes: int) -> None:
    src = agent.register(_random(nbytes, seed=nbytes))
    dst = agent.alloc(nbytes)
    f = agent.register(FileRegion(path=tmp_path / "big", create=True))
    agent.prepare(Op.WRITE, src.descs(), agent.name, f.descs([(0, nbytes)])).post().wait()
    agent.prepare(Op.READ, dst.descs(), agent.name, f.descs([(0, nbytes)])).post().wait()
    assert np.array_equal(dst.buffer, src.buffer)
    assert agent.query([FileRegion(path=tmp_path / "big")]) == [StorageInfo(size=nbytes)]


def test_a_prepared_transfer_posts_many_times_and_notifies_the_agent_itself(
    agent: Agent, tmp_path: Path
) -> None:
    buf = agent.alloc(8192)
    f = agent.register(FileRegion(path=tmp_path / "again", create=True, length=8192))
    prepared = agent.prepare(Op.WRITE, buf.descs(), agent.name, f.descs(), notify=b"landed")
    for i in range(5):
        buf.buffer[:] = i
        t = prepared.post()
        t.wait()
        assert t.state is TransferState.DONE
        assert (tmp_path / "again").read_bytes() == bytes([i]) * 8192
        assert agent.wait_notification(agent.name, b"landed", timeout=10) == b"landed"
    prepared.release()


def test_a_batch_over_many_files_is_one_transfer(agent: Agent, tmp_path: Path) -> None:
    n, size = 16, 256 << 10
    src = agent.register(_random(n * size, seed=11))
    dst = agent.alloc(n * size)
    files = [
        agent.register(FileRegion(path=tmp_path / f"chunk-{i}", create=True, length=size)) for i in range(n)
    ]
    put = agent.prepare_batch(
        Op.WRITE, [(src.descs([(i * size, size)]), f.descs()) for i, f in enumerate(files)], notify=b"all"
    )
    get = agent.prepare_batch(
        Op.READ, [(dst.descs([(i * size, size)]), f.descs()) for i, f in enumerate(files)]
    )
    t = put.post()
    assert t.nbytes == n * size
    t.wait()
    assert agent.wait_notification(agent.name, b"all", timeout=10) == b"all"
    for i in range(n):
        assert (tmp_path / f"chunk-{i}").read_bytes() == src.buffer[i * size : (i + 1) * size].tobytes()
    get.post().wait()
    assert np.array_equal(dst.buffer, src.buffer)
    with pytest.raises(InvalidDescriptorError, match="at least one"):
        agent.prepare_batch(Op.WRITE, [])
    files[3].release()
    with pytest.raises(RegistrationError):
        put.post().wait()  # a file deregistered since: a typed error, the others untouched


def test_o_direct_carries_aligned_runs_and_the_page_cache_the_rest(tmp_path: Path) -> None:
    with Agent("direct", AgentConfig(secret=SECRET)) as a:
        a.add_backend("posix", {"direct": "true", "lanes": "2"})
        aligned = np.zeros((8 << 20) + 4096, np.uint8)
        start = (-aligned.ctypes.data) % 4096
        view = aligned[start : start + (8 << 20)]  # page-aligned buffer, 8 MiB: two lanes
        view[:] = _random(8 << 20, seed=3)
        src = a.register(view)
        odd = a.register(_random(1000, seed=4))  # unaligned: through the page cache
        f = a.register(FileRegion(path=tmp_path / "direct", create=True))
        a.write(src.descs(), a.name, f.descs([(0, 8 << 20)])).wait()
        a.write(odd.descs(), a.name, f.descs([((8 << 20) + 1, 1000)])).wait()
        raw = (tmp_path / "direct").read_bytes()
        assert raw[: 8 << 20] == view.tobytes()
        assert raw[(8 << 20) + 1 :] == odd.buffer.tobytes()


def test_a_read_past_the_end_of_the_file_is_a_typed_error_and_the_agent_goes_on(
    agent: Agent, tmp_path: Path
) -> None:
    (tmp_path / "short").write_bytes(b"x" * 100)
    f = agent.register(FileRegion(path=tmp_path / "short", length=4096))
    into = agent.alloc(4096)
    t = agent.read(into.descs(), agent.name, f.descs())
    with pytest.raises(StorageError, match="reached the end of the file after 100"):
        t.wait()
    assert t.state is TransferState.ERROR
    ok = agent.read(into.descs([(0, 100)]), agent.name, f.descs([(0, 100)]))
    ok.wait()
    assert bytes(into.buffer[:100]) == b"x" * 100


def test_a_full_disk_is_a_typed_error(agent: Agent, tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes the kernel refuse writes past 1 MiB (EFBIG): the same path as ENOSPC
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    import signal

    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old[1]))
    try:
        src = agent.alloc(2 << 20)
        f = agent.register(FileRegion(path=tmp_path / "full", create=True))
        with pytest.raises(StorageError, match="write of"):
            agent.write(src.descs(), agent.name, f.descs([(0, 2 << 20)])).wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, previous)


def test_bad_registrations_and_requests_are_refused_by_name(agent: Agent, tmp_path: Path) -> None:
    with pytest.raises(InvalidBufferError, match="exactly one of fd= and path="):
        FileRegion()
    with pytest.raises(InvalidBufferError, match="offset"):
        FileRegion(path="x", offset=-1)
    with pytest.raises(InvalidBufferError, match="No such file"):
        agent.register(FileRegion(path=tmp_path / "missing"))
    with pytest.raises(InvalidBufferError, match="Is a directory"):
        agent.register(FileRegion(path=tmp_path))
    buf = agent.alloc(4096)
    f = agent.register(FileRegion(path=tmp_path / "f", create=True, length=4096))
    with pytest.raises(InvalidDescriptorError, match="ends past"):
        f.descs([(4000, 200)])
    with pytest.raises(InvalidDescriptorError, match="match one to one"):
        agent.prepare(Op.WRITE, buf.descs([(0, 100)]), agent.name, f.descs([(0, 200)]))
    with pytest.raises(InvalidDescriptorError, match="FILE or OBJ"):
        agent.prepare(Op.WRITE, buf.descs(), agent.name, buf.descs())
    f.release()
    with pytest.raises(RegistrationError, match="released"):
        f.descs()


def test_without_the_backend_or_for_gds_the_reason_is_said(tmp_path: Path) -> None:
    with Agent("bare", AgentConfig(secret=SECRET)) as a:
        buf = a.alloc(4096)
        f = a.register(FileRegion(path=tmp_path / "f", create=True, length=4096))
        with pytest.raises(BackendUnavailableError, match=r"add_backend\('posix'"):
            a.prepare(Op.WRITE, buf.descs(), a.name, f.descs())
        with pytest.raises(BackendUnavailableError, match="obj"):
            a.register(ObjectRegion("k", 10))
        for name in ("GDS", "GDS_MT", "HF3FS"):
            with pytest.raises(BackendUnavailableError, match="refused"):
                a.add_backend(name)
        with pytest.raises(BackendUnavailableError, match="unknown storage backend"):
            a.add_backend("tape")
        with pytest.raises(ConfigError, match="not a boolean"):
            a.add_backend("posix", {"direct": "perhaps"})
        with pytest.raises(ConfigError, match="must be >= 1"):
            a.add_backend("posix", {"lanes": "0"})
        # NIXL's own parameters, and keys a client passes through (LMCache's), are ignored
        a.add_backend("posix", {"use_aio": "true", "file_path": "/x", "use_direct_io": "false"})
        with pytest.raises(ConfigError, match="already has a FILE backend"):
            a.add_backend("posix")


def test_peers_never_see_or_reach_storage_regions(agent: Agent, tmp_path: Path) -> None:
    f = agent.register(FileRegion(path=tmp_path / "private", create=True, length=4096), name="secret-file")
    agent.register(np.zeros(4096, np.uint8), name="shared")
    with Agent("peer", AgentConfig(secret=SECRET)) as peer:
        peer.add_peer(agent.metadata())
        names = {peer.remote(agent.name, "shared").name}
        assert names == {"shared"}
        with pytest.raises(UnknownRegionError):
            peer.remote(agent.name, "secret-file")
    assert f.kind is MemoryKind.FILE


def test_the_lanes_cut_runs_on_page_boundaries() -> None:
    buf = memoryview(bytearray(10 << 20))
    handle = FileHandle(-1, 0, owned=False, path="nowhere")
    runs = posix._runs(handle, [0, 4 << 20], [buf[: 4 << 20], buf[4 << 20 :]], direct=False)
    assert len(runs) == 1 and len(runs[0][2]) == 2  # the file ranges follow each other: one run
    parts = posix._split(runs, 3)
    assert len(parts) == 3
    covered = []
    for part in parts:
        for h, off, views, _ in part:
            assert h is handle and off % 4096 == 0
            covered.append((off, sum(v.nbytes for v in views)))
    at = 0
    for off, n in sorted(covered):
        assert off == at
        at += n
    assert at == 10 << 20


# -- obj: OBJ memory on a real S3-API server ------------------------------------------------


def _obj_params(server: S3Server, bucket: str, **extra: str) -> dict[str, str]:
    return {
        "bucket": bucket,
        "endpoint_override": server.endpoint,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        "region": server.region,
        **extra,
    }


@pytest.fixture
def obj_agent(s3_server: S3Server, s3_bucket: str) -> Any:
    a = Agent("objects", AgentConfig(secret=SECRET))
    a.add_backend("OBJ", _obj_params(s3_server, s3_bucket, req_checksum="required"))
    yield a
    a.close()


@pytest.mark.parametrize("nbytes", [1, 256 << 10, (20 << 20) + 3])
def test_an_object_round_trips_and_its_size_is_queried(
    obj_agent: Agent, s3_server: S3Server, s3_bucket: str, nbytes: int
) -> None:
    src = obj_agent.register(_random(nbytes, seed=nbytes))
    obj = obj_agent.register(ObjectRegion(f"kv/{nbytes}", size=nbytes))
    assert obj.kind is MemoryKind.OBJ
    obj_agent.write(src.descs(), obj_agent.name, obj.descs(), notify=b"stored").wait()
    assert obj_agent.wait_notification(obj_agent.name, timeout=10) == b"stored"
    body = s3_client(s3_server).get_object(Bucket=s3_bucket, Key=f"kv/{nbytes}")["Body"].read()
    assert body == src.buffer.tobytes()  # the caller's bytes, no format of ours
    dst = obj_agent.alloc(nbytes)
    obj_agent.read(dst.descs(), obj_agent.name, obj.descs()).wait()
    assert np.array_equal(dst.buffer, src.buffer)
    assert obj_agent.query([ObjectRegion(f"kv/{nbytes}"), ObjectRegion("kv/none")]) == [
        StorageInfo(size=nbytes),
        None,
    ]


def test_a_write_gathers_descriptors_and_a_read_fetches_ranges(obj_agent: Agent) -> None:
    src = obj_agent.register(_random(3000, seed=9))
    obj = obj_agent.register(ObjectRegion("gathered"))
    # out of order, tiling [0, 3000): gathered into one PUT in object order
    obj_agent.write(
        src.descs([(2000, 1000), (0, 1000), (1000, 1000)]),
        obj_agent.name,
        obj.descs([(2000, 1000), (0, 1000), (1000, 1000)]),
    ).wait()
    dst = obj_agent.alloc(300)
    obj_agent.read(
        dst.descs([(0, 100), (100, 200)]), obj_agent.name, obj.descs([(2900, 100), (5, 200)])
    ).wait()
    assert dst.buffer[:100].tobytes() == src.buffer[2900:].tobytes()
    assert dst.buffer[100:].tobytes() == src.buffer[5:205].tobytes()


def test_s3_limits_and_misses_are_typed_errors(obj_agent: Agent) -> None:
    src = obj_agent.alloc(4096)
    obj = obj_agent.register(ObjectRegion("partial"))
    with pytest.raises(InvalidDescriptorError, match="no partial writes"):
        obj_agent.prepare(Op.WRITE, src.descs([(0, 100)]), obj_agent.name, obj.descs([(100, 100)]))
    missing = obj_agent.register(ObjectRegion("never-written"))
    with pytest.raises(StorageError, match="does not exist"):
        obj_agent.read(src.descs([(0, 10)]), obj_agent.name, missing.descs([(0, 10)])).wait()
    obj_agent.write(src.descs([(0, 100)]), obj_agent.name, obj.descs([(0, 100)])).wait()
    with pytest.raises(StorageError):
        obj_agent.read(src.descs([(0, 200)]), obj_agent.name, obj.descs([(0, 200)])).wait()


def test_a_missing_bucket_or_bad_parameters_fail_at_add_backend(s3_server: S3Server) -> None:
    with Agent("nobucket", AgentConfig(secret=SECRET)) as a:
        with pytest.raises(StorageError, match="NoSuchBucket"):
            a.add_backend("obj", _obj_params(s3_server, "no-such-bucket-here"))
        with pytest.raises(ConfigError, match="bucket"):
            a.add_backend("obj", {"endpoint_override": s3_server.endpoint})


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda.gpu_available(), reason="no usable GPU")
def test_vram_moves_to_a_file_and_back_through_host_staging(agent: Agent, tmp_path: Path) -> None:
    import cupy

    src = cupy.arange(1 << 18, dtype=cupy.uint32)  # 1 MiB
    dst = cupy.zeros_like(src)
    rs, rd = agent.register(src), agent.register(dst)
    assert rs.kind is MemoryKind.VRAM
    f = agent.register(FileRegion(path=tmp_path / "vram", create=True))
    agent.write(rs.descs(), agent.name, f.descs([(0, 1 << 20)])).wait()
    assert (tmp_path / "vram").read_bytes() == cupy.asnumpy(src).tobytes()
    agent.read(rd.descs(), agent.name, f.descs([(0, 1 << 20)])).wait()
    assert bool((dst == src).all())
