"""The Kubernetes API for the operator: the only module that imports the ``kubernetes`` client.

The dynamic client discovers what the server has, so one code path serves 1.20 (PDBs in
``policy/v1beta1``) and later (``policy/v1``). `apply` is idempotent: it creates a missing
object, leaves one alone when every field we set already has our value (no write, no new
generation), and otherwise merge-patches our fields back (a child that drifted is repaired;
fields the server or others added stay).

Errors come out as `KubeError`, with ``transient`` telling the caller whether to retry.
"""

from __future__ import annotations

import base64
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weft.fabric.errors import WeftError


class KubeError(WeftError):
    """A Kubernetes API call failed; ``transient``: worth retrying (conflicts, 5xx, timeouts)."""

    def __init__(self, message: str, *, status: int | None = None, transient: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


def contains(live: Any, desired: Any) -> bool:
    """Every field of `desired` is in `live` with the same value (lists: same length, items
    compared the same way); fields only in `live` (server defaults) do not matter."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(map(contains, live, desired))
    if isinstance(desired, (int, float)) and isinstance(live, str):
        return str(desired) == live  # quantities the server turned into strings
    return bool(live == desired)


@dataclass(frozen=True, slots=True)
class Scale:
    """An object's scale subresource (autoscaling/v1 Scale), what autoscalers read.

    Attributes:
        replicas: ``spec.replicas``, the replicas asked for.
        status_replicas: ``status.replicas``, the pods that exist; None before the first status.
        resource_version: the object's resourceVersion when read.
    """

    replicas: int
    status_replicas: int | None
    resource_version: str


class Kube:
    """A connection to one cluster: ``kubeconfig`` (or ``$KUBECONFIG``, ``~/.kube/config``),
    else the pod's service account."""

    def __init__(self, kubeconfig: str | os.PathLike[str] | None = None) -> None:
        from kubernetes import client, config, dynamic

        path = kubeconfig or os.environ.get("KUBECONFIG") or (Path.home() / ".kube" / "config")
        try:
            if Path(path).exists():
                config.load_kube_config(config_file=str(path))
            else:
                config.load_incluster_config()
        except Exception as exc:
            raise KubeError(
                f"no Kubernetes credentials ({path} missing, not in a pod): {exc}", transient=False
            ) from None
        self._api = client.ApiClient()
        self._dynamic = dynamic.DynamicClient(self._api)
        self._resources: dict[tuple[str, str], Any] = {}
        self._missing: set[tuple[str, str]] = set()
        # the client's discovery cache is not thread-safe (kopf runs handlers on threads)
        self._discovery = threading.Lock()

    def close(self) -> None:
        self._api.close()

    def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        if key not in self._resources:
            self._resources[key] = self._call(
                "discover",
                f"{kind}.{api_version}",
                lambda: self._dynamic.resources.get(api_version=api_version, kind=kind),
            )
        return self._resources[key]

    @staticmethod
    def _call(op: str, what: str, fn: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError

        try:
            return fn()
        except ResourceNotFoundError as exc:
            raise KubeError(
                f"{op} {what}: the server has no such resource ({exc})", status=404, transient=False
            ) from None
        except DynamicApiError as exc:
            status = int(getattr(exc, "status", 0) or 0)
            raise KubeError(
                f"{op} {what}: {status} {_reason(exc)}", status=status, transient=_transient(status)
            ) from None
        except ApiException as exc:
            status = int(exc.status or 0)
            raise KubeError(
                f"{op} {what}: {status} {exc.reason}", status=status, transient=_transient(status)
            ) from None
        except (OSError, TimeoutError) as exc:
            raise KubeError(f"{op} {what}: {exc}", transient=True) from None

    def preferred_version(self, group: str, kind: str, versions: list[str]) -> str:
        """The first of `versions` (``group/version``) the server serves `kind` in."""
        for v in versions:
            try:
                self._resource(v, kind)
                return v
            except KubeError as exc:
                if exc.transient:
                    raise
        raise KubeError(f"the server serves {kind} in none of {versions}", transient=False)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None) -> dict[str, Any] | None:
        res = self._resource(api_version, kind)
        try:
            obj = self._call(
                "get", f"{kind} {namespace}/{name}", lambda: res.get(name=name, namespace=namespace)
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(obj.to_dict())

    def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str
    ) -> list[dict[str, Any]]:
        res = self._resource(api_version, kind)
        got = self._call("list", kind, lambda: res.get(namespace=namespace, label_selector=label_selector))
        return [dict(item) for item in got.to_dict().get("items", [])]

    def apply(self, manifest: dict[str, Any]) -> str:
        """Create, repair or leave alone; returns ``created``, ``repaired`` or ``unchanged``."""
        api_version, kind = manifest["apiVersion"], manifest["kind"]
        name, namespace = manifest["metadata"]["name"], manifest["metadata"].get("namespace")
        res = self._resource(api_version, kind)
        what = f"{kind} {namespace}/{name}"
        live = self.get(api_version, kind, name, namespace)
        if live is None:
            try:
                self._call("create", what, lambda: res.create(body=manifest, namespace=namespace))
                return "created"
            except KubeError as exc:
                if exc.status != 409:  # someone (a previous run of ours) made it meanwhile
                    raise
                live = self.get(api_version, kind, name, namespace) or {}
        desired = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind", "status")}
        if contains(live, desired):
            return "unchanged"
        self._call(
            "patch",
            what,
            lambda: res.patch(
                body=desired, name=name, namespace=namespace, content_type="application/merge-patch+json"
            ),
        )
        return "repaired"

    def patch_status(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None,
        status: dict[str, Any],
        resource_version: str | None = None,
    ) -> str:
        """Merge-patch the status subresource; the object's new resourceVersion.

        Args:
            resource_version: patch only if the object is still at this version (409 if not).
        """
        res = self._resource(api_version, kind)
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        done = self._call(
            "patch status of",
            f"{kind} {namespace}/{name}",
            lambda: res.status.patch(
                body=body, name=name, namespace=namespace, content_type="application/merge-patch+json"
            ),
        )
        return str(
            ((done.to_dict() if done is not None else {}).get("metadata") or {}).get("resourceVersion") or ""
        )

    def get_scale(self, api_version: str, kind: str, name: str, namespace: str | None) -> Scale:
        """The object's scale subresource: ``spec.replicas``, ``status.replicas`` and the
        resourceVersion to write back against (`patch_scale`).

        Raises:
            KubeError: the object or its scale subresource does not exist (404), or the API
                refused or did not answer.
        """
        scale = self._resource(api_version, kind).subresources["scale"]
        obj = self._call(
            "get scale of", f"{kind} {namespace}/{name}", lambda: scale.get(name=name, namespace=namespace)
        ).to_dict()
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        replicas = status.get("replicas")
        return Scale(
            replicas=int(spec.get("replicas") or 0),
            status_replicas=None if replicas is None else int(replicas),
            resource_version=str((obj.get("metadata") or {}).get("resourceVersion") or ""),
        )

    def patch_scale(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None,
        replicas: int,
        resource_version: str,
    ) -> None:
        """Set ``spec.replicas`` through the scale subresource, as ``kubectl scale`` and an HPA
        do (so they compose), and only if the object is still at `resource_version`.

        Raises:
            KubeError: 409 when the object changed since it was read (someone scaled
                meanwhile), or the API refused or did not answer.
        """
        scale = self._resource(api_version, kind).subresources["scale"]
        meta = {"resourceVersion": resource_version} if resource_version else {}
        self._call(
            "patch scale of",
            f"{kind} {namespace}/{name}",
            lambda: scale.patch(
                body={"metadata": meta, "spec": {"replicas": replicas}},
                name=name,
                namespace=namespace,
                content_type="application/merge-patch+json",
            ),
        )

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None) -> bool:
        res = self._resource(api_version, kind)
        try:
            self._call(
                "delete", f"{kind} {namespace}/{name}", lambda: res.delete(name=name, namespace=namespace)
            )
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    def read_secret(self, name: str, namespace: str) -> dict[str, bytes]:
        obj = self.get("v1", "Secret", name, namespace)
        if obj is None:
            raise KubeError(f"Secret {namespace}/{name} does not exist", status=404, transient=True)
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}


def _transient(status: int) -> bool:
    return status in (0, 409, 429) or status >= 500


def _reason(exc: Any) -> str:
    summary = getattr(exc, "summary", None)
    if callable(summary):
        try:
            return str(summary())
        except Exception:
            pass
    return str(getattr(exc, "reason", "") or exc).splitlines()[0]
