"""Registration of each buffer kind and descriptor validation."""

from __future__ import annotations

import array
import mmap
from typing import ClassVar

import numpy as np
import pytest

from weft import (
    Agent,
    DeviceUnavailableError,
    InvalidBufferError,
    InvalidDescriptorError,
    MemoryKind,
    RegistrationError,
)
from weft.fabric import _cuda


@pytest.fixture
def agent(make_agent) -> Agent:  # type: ignore[no-untyped-def]
    return make_agent("a", "tcp")  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.zeros(1000, np.float16),
        lambda: np.zeros((4, 8, 16), np.float32),
        lambda: bytearray(100),
        lambda: array.array("d", [1.0] * 10),
        lambda: memoryview(bytearray(64)),
    ],
    ids=["numpy-f16", "numpy-3d", "bytearray", "array", "memoryview"],
)
def test_host_buffers_register(agent: Agent, make) -> None:  # type: ignore[no-untyped-def]
    obj = make()
    reg = agent.register(obj)
    assert reg.kind is MemoryKind.DRAM
    assert reg.size == memoryview(obj).nbytes
    assert reg.addr == np.frombuffer(memoryview(obj).cast("B"), np.uint8).ctypes.data
    reg.release()
    assert reg.released


def test_mmap_and_readonly(agent: Agent, tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = mmap.mmap(-1, 1 << 16)
    with agent.register(m, name="map") as reg:
        assert reg.size == 1 << 16
    m.close()  # released: the mmap has no exported buffers left
    ro = agent.register(b"immutable bytes")
    assert agent._metadata_record().regions[-1].readonly
    with pytest.raises(RegistrationError, match="read-only"):
        agent.register(b"x" * 10, readonly=False)
    ro.release()


def test_bad_buffers_are_typed(agent: Agent) -> None:
    with pytest.raises(InvalidBufferError, match="buffer protocol"):
        agent.register(object())
    with pytest.raises(InvalidBufferError, match="contiguous"):
        agent.register(np.zeros((10, 10))[:, 1])
    with pytest.raises(InvalidBufferError, match="empty"):
        agent.register(bytearray())
    with pytest.raises(InvalidBufferError, match=r"FileRegion\(...\) or ObjectRegion\(...\)"):
        agent.register(bytearray(10), kind=MemoryKind.FILE)
    agent.register(bytearray(10), name="dup")
    with pytest.raises(RegistrationError, match="already registered"):
        agent.register(bytearray(10), name="dup")
    with pytest.raises(RegistrationError, match="invalid region name"):
        agent.register(bytearray(10), name="no spaces")


@pytest.mark.skipif(_cuda.gpu_available(), reason="checks the GPU-less behaviour")
def test_vram_without_gpu_is_a_clear_error(agent: Agent) -> None:
    with pytest.raises(DeviceUnavailableError, match="VRAM"):
        agent.alloc(1 << 20, kind=MemoryKind.VRAM)
    with pytest.raises(DeviceUnavailableError, match="VRAM"):
        agent.register(bytearray(10), kind=MemoryKind.VRAM)

    class FakeCuda:  # an object that claims device memory
        __cuda_array_interface__: ClassVar[dict[str, object]] = {
            "shape": (4,),
            "typestr": "|u1",
            "data": (1234, False),
            "version": 3,
        }

    with pytest.raises(DeviceUnavailableError):
        agent.register(FakeCuda())
    # host memory keeps working
    assert agent.alloc(4096).kind is MemoryKind.DRAM


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda.gpu_available(), reason="no usable GPU")
def test_cupy_array_registers_as_vram(agent: Agent) -> None:
    import cupy

    arr = cupy.arange(1024, dtype=cupy.float32)
    reg = agent.register(arr, name="dev")
    assert reg.kind is MemoryKind.VRAM
    assert reg.size == 4096
    assert reg.addr == arr.data.ptr


def test_descriptor_validation(agent: Agent) -> None:
    reg = agent.register(bytearray(1000))
    d = reg.descs([(0, 10), (990, 10)])
    assert len(d) == 2 and d.total == 20
    assert reg.descs().pairs() == [(0, 1000)]
    assert reg.descs(np.array([[0, 1], [5, 5]], dtype=np.uint32)).total == 6
    assert reg.blocks(100, [9, 0]).pairs() == [(900, 100), (0, 100)]
    bad = [
        ([], "empty"),
        ([(0, 1001)], "ends past"),
        ([(1000, 1)], "ends past"),
        ([(-1, 5)], "negative"),
        ([(0, 0)], "length"),
        ([(0, -3)], "length"),
        ([(0.5, 3)], "integers"),
        ([(0, 1, 2)], "pairs"),
        ("nonsense", "pairs"),
        ([(2**64, 1)], "out of range|ends past|integers"),
    ]
    for pairs, match in bad:
        with pytest.raises(InvalidDescriptorError, match=match):
            reg.descs(pairs)
    with pytest.raises(InvalidDescriptorError, match="past"):
        reg.blocks(100, [10])
    with pytest.raises(InvalidDescriptorError):
        reg.blocks(0, [1])
