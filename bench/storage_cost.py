"""What a fabric transfer per KV chunk would cost (decision 012), on one 16 KiB chunk.

Four ways to write 16 KiB to a file, each repeated N times in this process: register the
buffer and a `FileRegion` and post a fresh transfer (what the KV store would do per chunk if
it went through `Agent`); post one prepared transfer again and again; `KVStore.put` (header,
digests and all); a bare `os.pwritev`.

    python bench/storage_cost.py [--n 3000] [--size 16384]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from weft.fabric import Agent, AgentConfig, FileRegion, Op
from weft.kvstore import KVStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--size", type=int, default=16 << 10)
    args = ap.parse_args()
    n, size = args.n, args.size
    with tempfile.TemporaryDirectory() as d, Agent("cost", AgentConfig(secret=os.urandom(16))) as agent:
        agent.add_backend("posix")
        buf = np.ones(size, np.uint8)
        fd = os.open(os.path.join(d, "f"), os.O_RDWR | os.O_CREAT)
        t0 = time.perf_counter()
        for _ in range(n):
            mem = agent.register(buf)
            f = agent.register(FileRegion(fd=fd, length=size))
            agent.prepare(Op.WRITE, mem.descs(), agent.name, f.descs()).post().wait()
            mem.release()
            f.release()
        fresh = (time.perf_counter() - t0) / n
        mem = agent.register(buf)
        f = agent.register(FileRegion(fd=fd, length=size))
        prepared = agent.prepare(Op.WRITE, mem.descs(), agent.name, f.descs())
        t0 = time.perf_counter()
        for _ in range(n):
            prepared.post().wait()
        again = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for _ in range(n):
            os.pwritev(fd, [buf], 0)
        bare = (time.perf_counter() - t0) / n
        os.close(fd)
        extra = {"enable_nixl_storage": True, "nixl_backend": "POSIX", "nixl_path": os.path.join(d, "kv")}
        config = {
            "chunk_size": 256,
            "nixl_buffer_size": 1 << 20,
            "nixl_buffer_device": "cpu",
            "extra_config": extra,
        }
        with KVStore.from_lmcache_config(config) as kv:
            t0 = time.perf_counter()
            for i in range(n):
                kv.put(f"chunk-{i % 64}", buf)
            put = (time.perf_counter() - t0) / n
    print(f"{size} B x {n}, microseconds per write:")
    print(f"  register + prepare + post + release  {fresh * 1e6:8.1f}")
    print(f"  prepared transfer, posted again       {again * 1e6:8.1f}")
    print(f"  KVStore.put (header, digests)         {put * 1e6:8.1f}")
    print(f"  os.pwritev                            {bare * 1e6:8.1f}")


if __name__ == "__main__":
    main()
