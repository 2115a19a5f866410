"""LMCache's own NIXL users, unmodified, in a fresh OS process (test and bench helper).

    python -m tests.nixl.lmcacheproc FLAVOUR SCENARIO 'JSON-ARGS'

FLAVOUR is `nixl` (the real NIXL 1.5 wheel) or `weft` (`weft.nixl.install()` first, so that
`import nixl._api` resolves to weft). It must be chosen before LMCache is imported: LMCache
binds NIXL's names at module import time in

- `lmcache/v1/storage_backend/nixl_storage_backend.py` (line 40: `from nixl._api import
  nixl_agent, nixl_agent_config, nixl_prepped_dlist_handle, nixl_xfer_handle, nixlBind`),
  imported lazily by `CreateStorageBackends` when `enable_nixl_storage` is set;
- `lmcache/v1/distributed/l2_adapters/nixl_store_l2_adapter.py` (line 15, the same names);
- `lmcache/v1/distributed/transfer_channel/impl/nixl_impl.py` imports `nixl._api` only when
  a context is made (`_load_nixl()`: `nixl._api`, then `nixl_cu12._api`, `nixl_cu13._api`);
- `lmcache/v1/transfer_channel/nixl_channel.py` (the P2P/PD channel) likewise, in a method.

Once `nixl._api` is in `sys.modules` the choice is made for the process, so every scenario
runs in its own interpreter. The last stdout line is `RESULT <json>`: what LMCache returned,
compared in the child with the tensors it put (so the parent asserts facts, not bytes), and
which module `nixl._api` really was.

Scenarios: `storage` (LMCache's `NixlStorageBackend` through `CreateStorageBackends`, POSIX
or OBJ), `l2` (`NixlStoreL2Adapter`), `chan-server` / `chan-client` (the distributed
transfer channel `nixl` between two processes).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

DEADLINE_S = 30.0

# LMCache 0.5.6 rejects `nixl_buffer_size` with `nixl_buffer_device: cpu` (its config check:
# "nixl_buffer_size must not be set when nixl_buffer_device='cpu'. In CPU mode NIXL shares
# LocalCPUBackend's pinned pool, which is sized by max_local_cpu_size"). The seed's file with
# that one line replaced by `max_local_cpu_size` (GiB) is the working CPU configuration.
CPU_POOL_GIB = 0.05


def use(flavour: str) -> None:
    """Choose what `import nixl._api` will be, before LMCache imports it."""
    if flavour == "weft":
        import weft.nixl  # type: ignore[import-not-found,unused-ignore]

        weft.nixl.install()
    elif flavour != "nixl":
        raise SystemExit(f"unknown flavour {flavour!r}")
    # for `nixl`, LMCache imports it itself, after torch, as in a real process: NIXL's meta
    # package picks its nixl_cu12 or nixl_cu13 wheel by what is already imported.


def nixl_origin() -> str:
    """The file `nixl._api` was really loaded from (the parent checks the flavour took)."""
    mod = sys.modules.get("nixl._api")
    return "" if mod is None else str(getattr(mod, "__file__", None) or mod.__name__)


def wait_for(cond: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    end = time.monotonic() + deadline_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not within {deadline_s} s")
        time.sleep(0.002)


def lmcache_config(backend: str, path: str, pool: int, params: dict[str, str] | None) -> dict[str, Any]:
    """The seed's `lmcache-config.yaml`, in the form LMCache 0.5.6 accepts on CPU."""
    extra: dict[str, Any] = {
        "enable_nixl_storage": True,
        "nixl_backend": backend,
        "nixl_pool_size": pool,
        "nixl_path": path,
    }
    if params:
        extra["nixl_backend_params"] = params
    return {
        "chunk_size": 256,
        "nixl_buffer_device": "cpu",
        "max_local_cpu_size": CPU_POOL_GIB,
        "local_cpu": False,
        "extra_config": extra,
    }


def storage(a: dict[str, Any]) -> dict[str, Any]:
    """Put `count` chunks into a pool of `pool` slots, then get every one back and a miss."""
    import asyncio

    import torch
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend import CreateStorageBackends

    cfg = LMCacheEngineConfig.from_dict(lmcache_config(a["backend"], a["path"], a["pool"], a.get("params")))
    md = LMCacheMetadata(
        model_name="weft-test",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.bfloat16,
        kv_shape=(2, 2, 256, 4, 64),  # (layers, K/V, chunk tokens, heads, head size): 512 KiB
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    backends = CreateStorageBackends(cfg, md, loop)
    nb = backends["NixlStorageBackend"]
    shape = torch.Size([2, 2, 256, 256])

    def key(i: int) -> Any:
        return CacheEngineKey("weft-test", 1, 0, i, torch.bfloat16)

    gen = torch.Generator().manual_seed(a.get("seed", 7))
    put: dict[int, torch.Tensor] = {}
    for i in range(a["count"]):
        obj = nb.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD, busy_loop=False)
        assert obj is not None, "LocalCPUBackend's pool is full"
        t = torch.randn(shape, generator=gen).to(torch.bfloat16)
        obj.tensor.copy_(t)
        put[i] = t
        nb.batched_submit_put_task([key(i)], [obj])
        obj.ref_count_down()
        wait_for(lambda i=i: nb.contains(key(i)), f"chunk {i} stored")

    result: dict[str, Any] = {"contains": [], "equal": [], "hit": []}
    for i in range(a["count"]):
        result["contains"].append(nb.contains(key(i)))
        got = nb.get_blocking(key(i))
        result["hit"].append(got is not None)
        result["equal"].append(got is not None and torch.equal(got.tensor, put[i]))
        if got is not None:
            got.ref_count_down()
    result["miss"] = nb.get_blocking(key(10_000)) is None and not nb.contains(key(10_000))
    if a["backend"] == "POSIX":
        names = sorted(os.listdir(a["path"]))
        result["files"] = len(names)
        result["file_sizes"] = sorted({os.path.getsize(os.path.join(a["path"], n)) for n in names})
    nb.close()
    loop.call_soon_threadsafe(loop.stop)
    return result


def l2(a: dict[str, Any]) -> dict[str, Any]:
    """NixlStoreL2Adapter: store, lookup+lock, load, full pool, delete, store again."""
    import torch
    from lmcache.v1.distributed.api import ObjectKey
    from lmcache.v1.distributed.internal_api import L1MemoryDesc
    from lmcache.v1.distributed.l2_adapters.nixl_store_l2_adapter import (
        NixlStoreL2Adapter,
        NixlStoreL2AdapterConfig,
    )
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    page, pages = a.get("page", 64 << 10), 16
    l1 = torch.zeros(page * pages, dtype=torch.uint8)
    desc = L1MemoryDesc(ptr=l1.data_ptr(), size=l1.numel(), align_bytes=page)
    adapter = NixlStoreL2Adapter(
        NixlStoreL2AdapterConfig.from_dict(
            {"backend": a["backend"], "backend_params": a["params"], "pool_size": a["pool"]}
        ),
        desc,
    )

    def obj(index: int) -> Any:
        meta = MemoryObjMetadata(
            shape=torch.Size([page]),
            dtype=torch.uint8,
            address=index * page,
            phy_size=page,
            ref_count=1,
            fmt=MemoryFormat.KV_2LTD,
        )
        return TensorMemoryObj(l1[index * page : (index + 1) * page], meta, None)

    def key(i: int) -> Any:
        return ObjectKey(chunk_hash=i.to_bytes(8, "little"), model_name="weft-test", kv_rank=0)

    def stored(task: int) -> Any:
        done: dict[int, Any] = {}

        def poll() -> bool:
            done.update(adapter.pop_completed_store_tasks())
            return task in done

        wait_for(poll, f"store task {task}")
        return done[task]

    def bits(get: Callable[[int], Any], task: int, n: int) -> list[bool]:
        bm = wait_for(lambda: get(task), f"task {task}")
        return [bm.test(i) for i in range(n)]

    gen = torch.Generator().manual_seed(a.get("seed", 11))
    pool = a["pool"]
    for i in range(pool):
        l1[i * page : (i + 1) * page] = torch.randint(0, 256, (page,), generator=gen, dtype=torch.uint8)
    kept = l1[: pool * page].clone()
    res: dict[str, Any] = {}
    first = stored(adapter.submit_store_task([key(i) for i in range(pool)], [obj(i) for i in range(pool)]))
    res["store_ok"], res["store_bytes"] = first >= 0, int(first)
    over = stored(adapter.submit_store_task([key(pool)], [obj(pool)]))
    res["full_store_ok"] = over >= 0
    keys = [key(i) for i in range(pool + 1)]
    res["lookup"] = bits(
        adapter.query_lookup_and_lock_result, adapter.submit_lookup_and_lock_task(keys, {}), pool + 1
    )
    adapter.submit_unlock(keys[:pool])
    dst = list(range(pool, 2 * pool))  # load into other pages of L1, then compare
    l1[pool * page : 2 * pool * page] = 0
    res["load"] = bits(
        adapter.query_load_result, adapter.submit_load_task(keys[:pool], [obj(d) for d in dst]), pool
    )
    res["equal"] = bool(torch.equal(l1[pool * page : 2 * pool * page], kept))
    adapter.delete([key(0)])
    res["after_delete"] = bits(
        adapter.query_lookup_and_lock_result, adapter.submit_lookup_and_lock_task([key(0)], {}), 1
    )
    l1[pool * page : (pool + 1) * page] = torch.randint(0, 256, (page,), generator=gen, dtype=torch.uint8)
    newer = l1[pool * page : (pool + 1) * page].clone()
    res["reuse_store_ok"] = stored(adapter.submit_store_task([key(pool)], [obj(pool)])) >= 0
    l1[(pool + 1) * page : (pool + 2) * page] = 0
    res["reuse_load"] = bits(
        adapter.query_load_result, adapter.submit_load_task([key(pool)], [obj(pool + 1)]), 1
    )
    res["reuse_equal"] = bool(torch.equal(l1[(pool + 1) * page : (pool + 2) * page], newer))
    adapter.close()
    return res


def _l1(pages: int, page: int, seed: int | None) -> Any:
    import torch

    if seed is None:
        return torch.zeros(pages * page, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (pages * page,), generator=gen, dtype=torch.uint8)


def chan_server(a: dict[str, Any]) -> dict[str, Any]:
    """Serve a seeded L1 buffer on the `nixl` transfer channel until stdin closes."""
    from lmcache.v1.distributed.internal_api import L1MemoryDesc
    from lmcache.v1.distributed.transfer_channel import create_transfer_channel_context

    l1 = _l1(a["pages"], a["page"], a["seed"])
    desc = L1MemoryDesc(ptr=l1.data_ptr(), size=l1.numel(), align_bytes=a["page"])
    ctx = create_transfer_channel_context("nixl", desc, a["url"], a["url"], backends=a.get("backends"))
    print("READY", flush=True)
    sys.stdin.read()  # the parent closes stdin (or kills us)
    ctx.close()
    return {"served": True}


def chan_client(a: dict[str, Any]) -> dict[str, Any]:
    """READ pages from the server's L1 into ours; compare with the seeded pattern."""
    from lmcache.v1.distributed.internal_api import L1MemoryDesc
    from lmcache.v1.distributed.transfer_channel import create_transfer_channel_context

    page, pages = a["page"], a["pages"]
    l1 = _l1(pages, page, None)
    expect = _l1(pages, page, a["seed"])
    desc = L1MemoryDesc(ptr=l1.data_ptr(), size=l1.numel(), align_bytes=page)
    ctx = create_transfer_channel_context("nixl", desc, a["url"], a["url"], backends=a.get("backends"))
    client = ctx.get_transfer_channel_client(a["server"])
    res: dict[str, Any] = {}
    # one READ per object of `obj_pages` pages, objects read into reversed positions
    n = pages // a["obj_pages"]
    size = a["obj_pages"] * page
    remote = ctx.get_transfer_channel_address([(i * size, size) for i in range(n)])
    local = ctx.get_transfer_channel_address([((n - 1 - i) * size, size) for i in range(n)])
    if a.get("pause"):  # one READ opens the data path; then the parent may kill the server
        first = client.submit_read(local, remote)
        wait_for(lambda: client.query_read_status(first).is_finished(), "first read")
        l1.zero_()
        print("CONNECTED", flush=True)
        sys.stdin.readline()
    t0 = time.monotonic()
    try:
        task = client.submit_read(local, remote)
        out = wait_for(
            lambda: (r := client.query_read_status(task)).is_finished() and r,
            "read",
            a.get("deadline", DEADLINE_S),
        )
    except Exception as e:  # what LMCache's channel lets through is the finding
        res["raised"] = f"{type(e).__name__}: {e}"[:300]
        res["elapsed_s"] = time.monotonic() - t0
        return res
    res["elapsed_s"] = time.monotonic() - t0
    res["mask"] = list(out.succeeded_mask)
    ok = True
    for i in range(n):
        got = l1[(n - 1 - i) * size : (n - i) * size]
        ok = ok and bool((got == expect[i * size : (i + 1) * size]).all())
    res["equal"] = ok
    ctx.close()
    return res


SCENARIOS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "storage": storage,
    "l2": l2,
    "chan-server": chan_server,
    "chan-client": chan_client,
}


def main() -> int:
    flavour, scenario, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    use(flavour)
    result = SCENARIOS[scenario](args)
    result["nixl_api"] = nixl_origin()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
