"""GPU memory for the packages built on the fabric: detection and device/host copies.

The KV store stages device buffers through host memory and the expert-parallel exchange
moves tokens between device and host, so both need what the fabric's CuPy adapter does. They
use it through this module: `_cuda` stays private to the fabric (the one module that imports
CuPy, free to change), and these names are the part other packages may rely on.
"""

from weft.fabric._cuda import (
    alloc,
    cuda_pointer,
    device_to_host,
    gpu_available,
    gpu_count,
    host_to_device,
    require_gpu,
)

__all__ = [
    "alloc",
    "cuda_pointer",
    "device_to_host",
    "gpu_available",
    "gpu_count",
    "host_to_device",
    "require_gpu",
]
