"""S3 clients for the KV store's OBJ tier, measured against a local S3-API server (moto).

boto3 (the reference client, pure Python over urllib3) against obstore (Rust's object_store
behind a thin Python layer), writing and reading one 64 MiB object and 200 objects of
256 KiB, each client in its own subprocess so neither warms the other, with the client process's
CPU time per MB (all its threads). moto's server is
Python too, so these figures rank the clients' overheads; they are not S3's throughput.

    .venv/bin/pip install obstore    # boto3 comes with moto[server] in the dev extra
    .venv/bin/python bench/s3_clients.py
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SHAPES = [("1 x 64 MiB", 1, 64 << 20), ("200 x 256 KiB", 200, 256 << 10)]

CLIENT = r"""
import json, os, sys, time
kind, endpoint, bucket = sys.argv[1:4]
shapes = json.loads(sys.argv[4])
out = {}
if kind.startswith("boto3"):
    import boto3, botocore.config
    # boto3-lean: no per-request CRC (botocore computes one on every put by default)
    lean = dict(request_checksum_calculation="when_required", response_checksum_validation="when_required")
    cfg = botocore.config.Config(**lean) if kind == "boto3-lean" else None
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                      region_name="us-east-1", config=cfg)
    s3.create_bucket(Bucket=bucket)
    put = lambda key, data: s3.put_object(Bucket=bucket, Key=key, Body=data)
    get = lambda key: s3.get_object(Bucket=bucket, Key=key)["Body"].read()
else:
    import boto3, obstore
    from obstore.store import S3Store
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    store = S3Store(bucket, endpoint=endpoint, access_key_id="k", secret_access_key="s", region="us-east-1",
                    client_options={"allow_http": True})
    put = lambda key, data: obstore.put(store, key, data)
    get = lambda key: bytes(obstore.get(store, key).bytes())
for name, count, size in shapes:
    data = os.urandom(size)
    t, c = time.perf_counter(), time.process_time()
    for i in range(count):
        put(f"{name}/{i}", data)
    w, wc = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    for i in range(count):
        assert get(f"{name}/{i}") == data
    r, rc = time.perf_counter() - t, time.process_time() - c
    mb = count * size / 1e6
    out[name] = {"write_mbps": mb / w, "read_mbps": mb / r,
                 "write_cpu_ms_per_mb": wc * 1e3 / mb, "read_cpu_ms_per_mb": rc * 1e3 / mb}
print(json.dumps(out))
"""


def start_moto() -> tuple[subprocess.Popen[bytes], str] | None:
    """moto's S3 server on a free loopback port: (process, endpoint), or None if not installed."""
    binary = Path(sys.executable).parent / "moto_server"
    found = str(binary) if binary.exists() else shutil.which("moto_server")
    if not found:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [found, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return proc, endpoint
        except urllib.error.HTTPError:
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("moto_server did not start") from None
            time.sleep(0.1)


def main() -> None:
    started = start_moto()
    if started is None:
        sys.exit("moto_server not found: pip install 'moto[server]'")
    server, endpoint = started
    try:
        results = {}
        for kind in ("boto3", "boto3-lean", "obstore"):
            done = subprocess.run(
                [sys.executable, "-c", CLIENT, kind, endpoint, f"bench-{kind}", json.dumps(SHAPES)],
                check=False,
                capture_output=True,
                text=True,
                timeout=600,
                env=dict(os.environ),
            )
            if done.returncode != 0:
                results[kind] = {"error": done.stderr.strip().splitlines()[-1:]}
                continue
            results[kind] = json.loads(done.stdout)
    finally:
        server.terminate()
        server.wait(10)
    print("| client | shape | write MB/s | read MB/s | client CPU ms/MB write | read |")
    print("|---|---|---|---|---|---|")
    for kind, rows in results.items():
        if "error" in rows:
            print(f"| {kind} | - | failed: {rows['error']} | |")
            continue
        for shape, r in rows.items():
            print(
                f"| {kind} | {shape} | {r['write_mbps']:.0f} | {r['read_mbps']:.0f} "
                f"| {r['write_cpu_ms_per_mb']:.2f} | {r['read_cpu_ms_per_mb']:.2f} |"
            )
    out = Path("bench/out/s3_clients.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
