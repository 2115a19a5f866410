"""The `weft` command: ``weft agent``, ``weft status``, ``weft demo``, ``weft version``.

Settings of `agent` and `status` come from flags, then ``WEFT_*`` variables, then (`agent`)
a config file; see `weft.api.agent_settings` for the variables and the file format.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from weft.membership import read_group_status

if TYPE_CHECKING:
    from weft.membership.status import GroupStatus

EXIT_OK = 0
EXIT_FAILED = 1
"""Bad input (a usage error, a bad setting, a resource the settings ask for that this machine
does not have) or another failure to start."""
EXIT_ETCD_UNREACHABLE = 2
"""No etcd endpoint answered (only ever this: argparse's own usage-error status 2 is not used)."""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line and exit status `EXIT_FAILED`: argparse's own
    status 2 is documented here as "etcd unreachable"."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_FAILED, f"{self.prog}: {message} (see {self.prog} --help)\n")


STATUS_JSON_HELP = """\
--json prints one object (keys in this order; members sorted by name):

  {"group": str, "namespace": str,
   "revision": int,                  etcd revision the read is consistent at
   "leader": str | null,             from the `leader` key (verified when a token is given)
   "plan_epoch": int | null,         epoch of the group's plan (null: none yet)
   "plan": null | {"epoch": int, "leader": str, "roles": {member: "prefill|decode"},
            "experts": {"<expert id>": [member, ...]}, "under_replicated": [int],
            "verified": bool, "acked": [member, ...]},      members that acked this epoch
   "members": [{"name": str, "generation": int, "state": "joining|active|draining",
                "node": str, "lease_ttl_left": int | null,   seconds, null: no lease
                "role": str | null, "verified": bool,        signed with the join token
                "incarnation": int, "capabilities": {...}, "http": str | null}],
   "invalid": [{"key": str, "error": str}]}                   records that do not decode

Without the join token (--secret-file or WEFT_SECRET) records are read unchecked and shown
with verified false. Exit status: 0; 1 on bad input (usage, settings) or other errors; 2 when
etcd is unreachable.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `weft` command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "agent":
        level = args.log_level or ("DEBUG" if args.verbose else "INFO")
        _logging(level, "%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _agent(args, os.environ)
    _logging("DEBUG" if args.verbose else "WARNING", "%(levelname)s %(name)s: %(message)s")
    if args.command == "status":
        return _status(args, os.environ)
    if args.command == "crds":
        return _crds(args)
    if args.command == "operator":
        from weft.operator import handlers

        return handlers.run(
            debug=args.log_level == "DEBUG",
            namespaces=args.namespace or [],
            clusterwide=args.all_namespaces,
            standalone=args.standalone,
            peering=args.peering,
            priority=args.priority,
            liveness=args.liveness,
        )
    if args.command == "version":
        from weft import __version__

        print(__version__)
        return EXIT_OK
    from weft import demo

    return demo.run()


def _crds(args: argparse.Namespace) -> int:
    from weft.api.transfergroup import crd_yaml

    if args.pod_schema_from:
        status = _pod_schema(args.pod_schema_from, args.kubernetes_version, args.pod_schema_output)
        if status != EXIT_OK:
            return status
    text = crd_yaml()
    if args.output == "-":
        sys.stdout.write(text)
        return EXIT_OK
    path = Path(args.output)
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"{path} is not what `weft crds` generates: run `weft crds -o {path}`", file=sys.stderr)
            return 1
        return EXIT_OK
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return EXIT_OK


def _pod_schema(source: str, version: str | None, output: str | None) -> int:
    """Regenerate ``weft/api/podspec.json`` from an OpenAPI v2 document: a file, ``-`` (stdin:
    ``kubectl get --raw /openapi/v2 | weft crds --pod-schema-from -``) or an http(s) URL
    (``kubectl proxy``'s ``http://127.0.0.1:8001/openapi/v2``)."""
    import json
    import urllib.request

    from weft.api import podschema

    if source == "-":
        text = sys.stdin.read()
    elif source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=60) as reply:
            text = reply.read().decode()
    else:
        text = Path(source).read_text()
    openapi = json.loads(text)
    version = version or str((openapi.get("info") or {}).get("version") or "")
    if not version or version == "unversioned":
        print("the document names no Kubernetes version: give --kubernetes-version", file=sys.stderr)
        return EXIT_FAILED
    try:
        doc = podschema.document(openapi, version)
    except podschema.PodSchemaError as exc:
        print(f"{source}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    path = Path(output) if output else Path(podschema.__file__).with_name(podschema.DATA_FILE)
    path.write_text(podschema.dumps(doc))
    print(f"wrote {path}")
    return EXIT_OK


def _logging(level: str, fmt: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="weft", description="weft: a resilient transfer fabric")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the local demo")
    sub.add_parser("version", help="print the version")
    op = sub.add_parser("operator", help="run the TransferGroup operator (kopf; KUBECONFIG or in-cluster)")
    where = op.add_mutually_exclusive_group(required=True)
    where.add_argument("--namespace", "-n", action="append", help="watch this namespace (repeatable)")
    where.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    op.add_argument("--standalone", action="store_true", help="no peering: the only operator replica")
    op.add_argument("--peering", help="kopf peering object for leader election (default weft-operator)")
    op.add_argument(
        "--priority",
        type=int,
        help="this replica's peering priority; the highest serves (default: lower the later it started)",
    )
    op.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    op.add_argument(
        "--liveness", metavar="URL", help="answer liveness probes there, e.g. http://0.0.0.0:8080/healthz"
    )
    crds = sub.add_parser("crds", help="write the TransferGroup CRD generated from weft.api")
    crds.add_argument("--output", "-o", default="crds/transfergroup.yaml", help="file to write, - for stdout")
    crds.add_argument(
        "--check", action="store_true", help="exit 1 if the file differs from what would be written"
    )
    crds.add_argument(
        "--pod-schema-from",
        metavar="FILE_OR_URL",
        help="first regenerate weft/api/podspec.json from this OpenAPI v2 document (- for stdin)",
    )
    crds.add_argument(
        "--kubernetes-version", help="the version the document comes from (default: its info.version)"
    )
    crds.add_argument(
        "--pod-schema-output",
        help="write the schema there instead of weft/api/podspec.json (to compare: the CRD still uses that)",
    )

    _agent_parser(sub)
    _status_parser(sub)
    return parser


def _agent_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    agent = sub.add_parser(
        "agent",
        help="run the node agent: fabric, group membership, /healthz /readyz /metrics /status",
        description="Run the node agent until SIGTERM or SIGINT, then drain and leave the group. "
        "Flags override WEFT_* variables, which override the --config file.",
    )
    _group_flags(agent)
    agent.add_argument("--name", help="this agent's name in the group (WEFT_NAME)")
    agent.add_argument("--config", type=Path, metavar="FILE", help="YAML (or .json) settings file")
    agent.add_argument("--lease-ttl", metavar="SECONDS", help="member lease TTL (WEFT_LEASE_TTL; default 3)")
    agent.add_argument("--listen-host", metavar="H", help="fabric listen address (WEFT_LISTEN_HOST)")
    agent.add_argument("--listen-port", metavar="P", help="fabric port, 0: any (WEFT_LISTEN_PORT)")
    agent.add_argument(
        "--advertise-host", metavar="H", help="fabric address peers connect to (WEFT_ADVERTISE_HOST)"
    )
    agent.add_argument("--backends", metavar="B[,B]", help="data paths: local,tcp,ucx (WEFT_BACKENDS)")
    agent.add_argument("--http-host", metavar="H", help="HTTP endpoint address (WEFT_HTTP_HOST)")
    agent.add_argument("--http-port", metavar="P", help="HTTP endpoint port, 0: any (WEFT_HTTP_PORT)")
    agent.add_argument(
        "--drain-timeout",
        metavar="SECONDS",
        help="longest wait for transfers on SIGTERM (WEFT_DRAIN_TIMEOUT)",
    )
    agent.add_argument(
        "--join-timeout", metavar="SECONDS", help="longest wait for etcd when joining (WEFT_JOIN_TIMEOUT)"
    )
    agent.add_argument(
        "--kv-pool-bytes", metavar="N", help="host memory peers may write KV blocks into (WEFT_KV_POOL_BYTES)"
    )
    agent.add_argument("--node", help="node name shown to others (WEFT_NODE; default: the host name)")
    agent.add_argument("--ratio", metavar="P:D", help="prefill:decode members, e.g. 1:3 (WEFT_RATIO)")
    agent.add_argument("--min-prefill", metavar="N", help="at least N prefill members (WEFT_MIN_PREFILL)")
    agent.add_argument("--min-decode", metavar="N", help="at least N decode members (WEFT_MIN_DECODE)")
    agent.add_argument("--experts", metavar="E", help="MoE experts to place, 0: none (WEFT_EXPERTS)")
    agent.add_argument("--replication", metavar="R", help="replicas per expert (WEFT_REPLICATION)")
    agent.add_argument(
        "--redundant-slots", metavar="S", help="extra replicas for the hottest experts (WEFT_REDUNDANT_SLOTS)"
    )
    agent.add_argument(
        "--gpu-less-roles",
        metavar="R[,R]",
        help="roles a member without a GPU may take (default prefill,decode)",
    )
    agent.add_argument(
        "--expert-source",
        metavar="SRC",
        help="expert weights when no replica survived: synthetic:BYTES, dir:PATH or "
        "kv:LMCACHE_CONFIG (the KV store, shared by the group) (WEFT_EXPERT_SOURCE)",
    )
    agent.add_argument(
        "--ready-file", type=Path, metavar="F", help="write JSON (pid, ports, generation) here once active"
    )
    agent.add_argument("--log-level", metavar="L", help="DEBUG, INFO (default), WARNING, ERROR")


def _status_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    status = sub.add_parser(
        "status",
        help="show a group's members as etcd has them",
        description="Read the group's keys from etcd once and show its members.",
        epilog=STATUS_JSON_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _group_flags(status)
    status.add_argument("--json", action="store_true", help="print JSON (schema below)")
    status.add_argument("--timeout", metavar="SECONDS", help="deadline of each etcd request (default 2)")


def _group_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", metavar="URL[,URL]", help="etcd endpoints (WEFT_ETCD)")
    p.add_argument("--group", help="group name (WEFT_GROUP)")
    p.add_argument("--namespace", metavar="NS", help="namespace (WEFT_NAMESPACE; default 'default')")
    p.add_argument("--secret-file", metavar="F", help="file holding the group join token (WEFT_SECRET_FILE)")
    p.add_argument("--etcd-ca", metavar="F", help="CA bundle of the etcd server (WEFT_ETCD_CA)")
    p.add_argument("--etcd-cert", metavar="F", help="etcd client certificate (WEFT_ETCD_CERT)")
    p.add_argument("--etcd-key", metavar="F", help="key of --etcd-cert (WEFT_ETCD_KEY)")
    p.add_argument("--etcd-user", metavar="U", help="etcd user (WEFT_ETCD_USER)")
    p.add_argument(
        "--etcd-password", metavar="P", help="etcd password (prefer WEFT_ETCD_PASSWORD: flags show in ps)"
    )


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _group_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "group": {"group": args.group, "namespace": args.namespace},
        "secret_file": args.secret_file,
        "etcd": {
            "endpoints": _split(args.etcd),
            "ca_file": args.etcd_ca,
            "cert_file": args.etcd_cert,
            "key_file": args.etcd_key,
            "username": args.etcd_user,
            "password": args.etcd_password,
        },
    }


# -- weft agent ------------------------------------------------------------------------------
def _agent(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from weft.agent import daemon
    from weft.fabric.errors import ConfigError

    overrides = _group_overrides(args) | {
        "name": args.name,
        "lease_ttl": args.lease_ttl,
        "listen_host": args.listen_host,
        "listen_port": args.listen_port,
        "advertise_host": args.advertise_host,
        "backends": _split(args.backends),
        "http_host": args.http_host,
        "http_port": args.http_port,
        "drain_timeout": args.drain_timeout,
        "join_timeout": args.join_timeout,
        "kv_pool_bytes": args.kv_pool_bytes,
        "node": args.node,
        "planning": {
            "ratio": args.ratio,
            "min_prefill": args.min_prefill,
            "min_decode": args.min_decode,
            "experts": args.experts,
            "replication": args.replication,
            "redundant_slots": args.redundant_slots,
            "expert_source": args.expert_source,
            "gpu_less_roles": _split(args.gpu_less_roles),
        },
    }
    try:
        settings = daemon.load_agent_settings(args.config, env, overrides)
        daemon.preflight(settings)
    except ConfigError as exc:
        print(f"weft agent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return asyncio.run(daemon.run_agent(settings, ready_file=args.ready_file))


# -- weft status -----------------------------------------------------------------------------
def _status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from weft.api import agent_settings
    from weft.membership import errors

    overrides = _group_overrides(args)
    overrides["etcd"]["request_timeout"] = args.timeout
    try:
        settings = agent_settings.resolve_settings(
            agent_settings.GroupClientSettings, env=env, overrides=overrides
        )
        secret = settings.join_token()
    except agent_settings.SettingsError as exc:
        print(f"weft status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        report = asyncio.run(read_group_status(settings, secret))
    except errors.EtcdUnavailableError as exc:
        where = ", ".join(settings.etcd.endpoints)
        print(f"weft status: cannot reach etcd at {where}: {exc}", file=sys.stderr)
        return EXIT_ETCD_UNREACHABLE
    except errors.EtcdError as exc:
        print(f"weft status: etcd refused the read: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(report.to_json())
    else:
        _print_status(report)
    return EXIT_OK


def _print_status(report: GroupStatus) -> None:
    from rich.console import Console
    from rich.table import Table

    def show(value: object) -> str:
        return "-" if value is None else str(value)

    leader = report.leader
    title = (
        f"{report.namespace}/{report.group}: {len(report.members)} members, "
        f"leader {show(leader)}, plan epoch {show(report.plan_epoch)}, revision {report.revision}"
    )
    table = Table(title=title)
    for column in ("name", "state", "generation", "node", "lease left", "role", "verified"):
        table.add_column(column)
    for m in report.members:
        name = m.name + (" (leader)" if m.name == leader else "")
        lease = "-" if m.lease_ttl_left is None else f"{m.lease_ttl_left} s"
        verified = "yes" if m.verified else "[yellow]no"
        table.add_row(name, m.state, str(m.generation), m.node, lease, show(m.role), verified)
    console = Console()
    console.print(table)
    plan = report.plan
    if plan is not None:
        roles = [str(role) for role in plan.roles.values()]
        console.print(
            f"plan {plan.epoch} by {plan.leader}: {roles.count('prefill')} prefill, "
            f"{roles.count('decode')} decode, {len(plan.experts)} experts, under-replicated "
            f"{list(plan.under_replicated) or 'none'}, acked by {len(plan.acked)}/{len(plan.roles)}",
            highlight=False,
        )
    for bad in report.invalid:
        console.print(f"[red]invalid record[/red] {bad.key}: {bad.error}", markup=True, highlight=False)


if __name__ == "__main__":
    sys.exit(main())
