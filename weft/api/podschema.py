"""The structural schema of a Kubernetes ``PodSpec``, derived from the API server's OpenAPI.

Why derived and not written: ``spec.template.spec`` of a TransferGroup is a real pod spec,
and the API server should refuse a bad one with the field named, as it does for a pod. A
hand-written schema would drift from the API it imitates; this one is converted from the
OpenAPI v2 document the API server itself publishes (``/openapi/v2``, or
``api/openapi-spec/swagger.json`` of the Kubernetes source), and a test checks the committed
file against a live kube-apiserver.

The conversion (`pod_spec_schema`) is pure. It turns OpenAPI v2 definitions into what a
CustomResourceDefinition accepts (a *structural* schema):

- ``$ref`` are inlined (structural schemas have no references). The PodSpec tree is not
  recursive; a recursive one cannot be inlined, and `PodSchemaError` says where it loops.
- descriptions are dropped: with them the PodSpec alone is several hundred KB, and the CRD
  must stay well under the 262144 bytes of kubectl's last-applied-configuration annotation
  (``kubectl apply`` of the CRD) and be cheap to publish. The field names are the ones every
  Kubernetes user knows; ``kubectl explain pod.spec`` has the prose.
- ``Quantity`` and ``IntOrString`` (format ``int-or-string``) become
  ``x-kubernetes-int-or-string: true`` with ``anyOf: [{type: integer}, {type: string}]``,
  the only way a structural schema says "a number or a string".
- every ``x-kubernetes-*`` extension of the source is dropped: the ``patch`` ones mean
  nothing in a CRD, ``unions`` is not a CRD field, and ``list-type``/``list-map-keys``
  would be wrong here: Kubernetes 1.20 requires a map list's keys to be required or
  defaulted, which PodSpec's (``containerPort``'s ``protocol``, for one) are not, so the API
  server would refuse the CRD.
- every other node keeps or gets a ``type`` (``object`` where the source says none).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from weft.api.errors import ConfigError

POD_SPEC = "io.k8s.api.core.v1.PodSpec"
_INT_OR_STRING_REFS = frozenset(
    {"io.k8s.apimachinery.pkg.api.resource.Quantity", "io.k8s.apimachinery.pkg.util.intstr.IntOrString"}
)
_KEPT = frozenset({"type", "format", "properties", "items", "additionalProperties", "required", "enum"})
DATA_FILE = "podspec.json"


class PodSchemaError(ConfigError):
    """The OpenAPI document cannot be turned into a structural PodSpec schema."""


def _int_or_string() -> dict[str, Any]:
    return {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}


def pod_spec_schema(openapi: dict[str, Any], root: str = POD_SPEC) -> dict[str, Any]:
    """The structural schema of definition `root` (the PodSpec) of an OpenAPI v2 document.

    Args:
        openapi: the document (``/openapi/v2`` or ``swagger.json``), with ``definitions``.
        root: the definition to convert.

    Returns:
        A JSON-schema dict a CRD's ``openAPIV3Schema`` accepts.

    Raises:
        PodSchemaError: a definition is missing, a reference loops, or a node is not one
            this converter knows how to express.
    """
    definitions = openapi.get("definitions")
    if not isinstance(definitions, dict) or root not in definitions:
        raise PodSchemaError(f"the OpenAPI document has no definition {root}")
    return _convert({"$ref": f"#/definitions/{root}"}, definitions, ())


def _convert(node: dict[str, Any], definitions: dict[str, Any], stack: tuple[str, ...]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is not None:
        name = str(ref).rsplit("/", 1)[-1]
        if name in _INT_OR_STRING_REFS:
            return _int_or_string()
        if name in stack:
            loop = " -> ".join((*stack[stack.index(name) :], name))
            raise PodSchemaError(f"recursive definition cannot be inlined in a structural schema: {loop}")
        if name not in definitions:
            raise PodSchemaError(f"reference to a missing definition {name} (from {' -> '.join(stack)})")
        return _convert(definitions[name], definitions, (*stack, name))
    if node.get("format") == "int-or-string":
        return _int_or_string()
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEPT:
            continue  # description, x-kubernetes-*: see the module docstring
        if key == "properties":
            out[key] = {prop: _convert(sub, definitions, stack) for prop, sub in sorted(value.items())}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value, definitions, stack)
        elif key == "additionalProperties":
            raise PodSchemaError(f"additionalProperties {value!r} under {' -> '.join(stack)}")
        else:
            out[key] = value
    out.setdefault("type", "object")
    return out


def document(openapi: dict[str, Any], kubernetes_version: str) -> dict[str, Any]:
    """The data file's content: the derived schema and where it came from."""
    return {
        "kubernetesVersion": kubernetes_version,
        "definition": POD_SPEC,
        "schema": pod_spec_schema(openapi),
    }


def dumps(doc: dict[str, Any]) -> str:
    """The data file's text (stable: sorted keys, one line per node, a final newline)."""
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def load() -> dict[str, Any]:
    """The committed document (``weft/api/podspec.json``, regenerated by
    ``weft crds --pod-schema-from``)."""
    text = resources.files("weft.api").joinpath(DATA_FILE).read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc
