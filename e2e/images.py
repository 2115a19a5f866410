"""The agent and operator images, built by Docker from agent/Dockerfile and
operator/Dockerfile with the project's wheels, and with no registry at all when `base` is
the Debian root filesystem of scripts/image-rootfs.sh (debootstrap + `docker import`).

Wheels: the dependencies' wheels are made once per pyproject.toml (``pip wheel``, cached in
``~/.cache/weft/wheels/<hash>``); weft's own wheel is made on every build. Images are tagged
by the hash of everything that goes into them, so an unchanged tree rebuilds nothing.

    python -m e2e.images build       # `make images`: prints the image names
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from e2e.shell import run, succeeds

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("WEFT_CACHE", Path.home() / ".cache" / "weft"))


@dataclass(frozen=True)
class Images:
    agent: str
    operator: str
    base: str | None  # the imported Debian base (also the in-chart etcd's image), if used


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:12]


def dependency_wheels() -> Path:
    """Wheels of every dependency of ``weft[operator]`` (and ``gpu`` is left out: CPU)."""
    key = _digest((ROOT / "pyproject.toml").read_bytes(), sys.version.encode())
    out = CACHE / "wheels" / key
    if (out / ".complete").exists():
        return out
    tmp = Path(tempfile.mkdtemp(prefix="wheels-", dir=out.parent if out.parent.exists() else None))
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(tmp), f"{ROOT}[operator]"], 900)
    for w in tmp.glob("weft-*.whl"):
        w.unlink()  # weft's own wheel is made per build
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".complete").touch()
    return out


def weft_wheel(into: Path) -> Path:
    run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(into), str(ROOT)],
        300,
    )
    return next(into.glob("weft-*.whl"))


def import_base(docker: Sequence[str]) -> str:
    """The Debian root filesystem (scripts/image-rootfs.sh) as image ``weft-base:<key>``."""
    tar = Path(run([str(ROOT / "scripts" / "image-rootfs.sh")], 900).strip().splitlines()[-1])
    ref = f"weft-base:{tar.stem.rsplit('-', 1)[-1]}"
    if not succeeds([*docker, "image", "inspect", ref]):
        run([*docker, "import", str(tar), ref], 600)
    return ref


def build_images(docker: Sequence[str], base: str | None = "debian-rootfs") -> Images:
    """Build (or find) both images. `docker`: the docker command (with its -H); `base`:
    ``"debian-rootfs"`` for the registry-free base, None for the Dockerfiles' default, or
    any image reference."""
    base_ref = import_base(docker) if base == "debian-rootfs" else base
    deps = dependency_wheels()
    with tempfile.TemporaryDirectory(prefix="weft-image-") as tmp:
        ctx = Path(tmp)
        wheels = ctx / "wheels"
        wheels.mkdir()
        own = weft_wheel(wheels)
        for w in deps.glob("*.whl"):
            os.link(w, wheels / w.name) if w.stat().st_dev == wheels.stat().st_dev else shutil.copy(w, wheels)
        made = {}
        for program in ("agent", "operator"):
            dockerfile = ROOT / program / "Dockerfile"
            shutil.copy(dockerfile, ctx / "Dockerfile")
            tag = _digest(
                dockerfile.read_bytes(), own.read_bytes(), str(base_ref).encode(), deps.name.encode()
            )
            ref = f"weft-{program}:{tag}"
            if not succeeds([*docker, "image", "inspect", ref]):
                args = ["--build-arg", f"BASE={base_ref}"] if base_ref else []
                run([*docker, "build", "--network", "none", "-q", *args, "-t", ref, str(ctx)], 900,
                    env=os.environ | {"DOCKER_BUILDKIT": "0"})  # fmt: skip
            made[program] = ref
            _prune(docker, f"weft-{program}", keep=ref)
    return Images(agent=made["agent"], operator=made["operator"], base=base_ref)


def _prune(docker: Sequence[str], repository: str, keep: str) -> None:
    """Every other tag of `repository` removed: each tree makes new tags, and the local
    driver's Docker data lives on between runs (in the cache). Images in use stay (rmi
    without -f refuses them)."""
    tags = run([*docker, "images", "--format", "{{.Repository}}:{{.Tag}}", repository], 60).split()
    stale = [t for t in tags if t != keep]
    if stale:
        run([*docker, "rmi", *stale], 300, check=False)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m e2e.images", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["build"])
    ap.add_argument(
        "--docker", default="docker", help="the docker command, e.g. 'docker -H unix:///run/x.sock'"
    )
    ap.add_argument(
        "--base", default=None, help="base image (default: the Dockerfiles'); debian-rootfs: no registry"
    )
    args = ap.parse_args(argv)
    images = build_images(args.docker.split(), args.base)
    print(f"agent: {images.agent}\noperator: {images.operator}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
