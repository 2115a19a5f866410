"""KV store POSIX tier against the machine's limit (os.pwrite / os.preadv), same files, same run.

Shapes from issue 5: one 256 MiB object, and 1000 chunks of 256 KiB. Page cache (no fsync),
as NIXL's POSIX figures in the issue were taken. The NIXL POSIX side-by-side lands with the
rest of issue 5.

    .venv/bin/python bench/kvstore.py [--dir DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from weft.kvstore import KVStore

SHAPES = [("1 x 256 MiB", 1, 256 << 20), ("1000 x 256 KiB", 1000, 256 << 10)]


def _best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench(root: Path, count: int, size: int, repeat: int) -> dict[str, float]:
    data = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8) for i in range(min(count, 16))]
    bufs = [np.empty(size, np.uint8) for _ in range(min(count, 16))]
    total = count * size
    cfg = {
        "chunk_size": 256,
        "nixl_buffer_size": 1 << 30,
        "nixl_buffer_device": "cpu",
        "extra_config": {
            "enable_nixl_storage": True,
            "nixl_backend": "POSIX",
            "nixl_pool_size": 8,
            "nixl_path": str(root / "weft"),
        },
    }
    out: dict[str, float] = {}
    with KVStore.from_lmcache_config(cfg) as kv:
        items = [(f"c{i}", data[i % len(data)]) for i in range(count)]
        out["weft_write_gbps"] = total / _best(lambda: kv.put_many(items), repeat) / 1e9
        keys = [k for k, _ in items]
        intos = [bufs[i % len(bufs)] for i in range(count)]
        out["weft_read_gbps"] = total / _best(lambda: kv.get_many(keys, into=intos), repeat) / 1e9
    raw = root / "raw"
    raw.mkdir(exist_ok=True)

    def raw_write() -> None:
        for i in range(count):
            fd = os.open(raw / f"c{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.pwrite(fd, data[i % len(data)], 0)
            os.close(fd)

    def raw_read() -> None:
        for i in range(count):
            fd = os.open(raw / f"c{i}", os.O_RDONLY)
            os.preadv(fd, [bufs[i % len(bufs)]], 0)
            os.close(fd)

    out["pwrite_gbps"] = total / _best(raw_write, repeat) / 1e9
    out["preadv_gbps"] = total / _best(raw_read, repeat) / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/out/kvstore.json"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="weft-bench-kv-", dir=args.dir))
    rows = {}
    try:
        for name, count, size in SHAPES:
            rows[name] = bench(root / name.replace(" ", ""), count, size, args.repeat)
            shutil.rmtree(root / name.replace(" ", ""), ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| shape | weft write | os.pwrite | weft/pwrite | weft read | os.preadv | weft/preadv |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['weft_write_gbps']:.2f} GB/s | {r['pwrite_gbps']:.2f} GB/s "
            f"| {r['weft_write_gbps'] / r['pwrite_gbps']:.2f} | {r['weft_read_gbps']:.2f} GB/s "
            f"| {r['preadv_gbps']:.2f} GB/s | {r['weft_read_gbps'] / r['preadv_gbps']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
