"""The ``gateway`` command: serve, check, keys (new, which), admin keys (create, list, get,
rotate, revoke), audit verify, usage, simulate, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn

from .config import ConfigError, LoadedConfig, ServerConfig, load_config, parse_config
from .errors import GatewayError
from .keys import hash_key, new_key
from .logs import setup_logging
from .server import tune_gc, uvicorn_config


class DrainingServer(uvicorn.Server):
    """uvicorn, but a first SIGTERM marks the gateway unready for ``delay`` seconds first.

    The delay lets Kubernetes take the pod out of its Service before the listener
    closes; then uvicorn stops accepting, lets in-flight requests and streams finish
    within the grace period, and exits.
    """

    def __init__(self, config: uvicorn.Config, gateway: Any, delay: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.delay = delay
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.gateway is not None:
            self.gateway.draining = True
        if sig == signal.SIGTERM and self.delay > 0 and not self._draining:
            self._draining = True
            timer = threading.Timer(self.delay, super().handle_exit, (sig, frame))
            timer.daemon = True
            timer.start()
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: Any = None) -> None:
        """Let open WebSockets end first: each closes with 1001 once its responses are
        done (the gateway is draining), within the grace period; then uvicorn's own."""
        if self.gateway is not None:
            self.gateway.draining = True
            deadline = time.monotonic() + (self.config.timeout_graceful_shutdown or 30)
            # Polled: the sockets close on their own watchdogs' ticks.
            while self.gateway.sockets and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await super().shutdown(sockets)


def _uvicorn_config(
    app: object, host: str, port: int, log_level: str = "info", grace: float = 30
) -> uvicorn.Config:
    return uvicorn_config(app, host=host, port=port, log_level=log_level, grace=grace)


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import create_app

    path = args.config or os.environ.get("GATEWAY_CONFIG")
    if not path:
        print("gateway serve: give --config FILE or set GATEWAY_CONFIG", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    app = create_app(loaded, config_path=str(path))
    cfg = loaded.config
    tune_gc(cfg.server.gc_freeze, cfg.server.gc_thresholds)
    if cfg.metrics.port:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics.port, cfg.metrics.host, registry=app.state.metrics.registry)
    server_cfg = uvicorn_config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        grace=cfg.server.shutdown_grace_seconds,
        header_timeout=cfg.server.header_timeout_seconds,
        keepalive=cfg.server.keepalive_timeout_seconds,
    )
    DrainingServer(server_cfg, app.state.gateway, cfg.server.drain_delay_seconds).run()
    return 0


class _Placeholders(dict[str, str]):
    """An environment in which every variable is set (``check --no-secrets``)."""

    def get(self, key: str, default: object = None) -> str:
        return "placeholder"


def cmd_check(args: argparse.Namespace) -> int:
    try:
        loaded = load_config(args.config, _Placeholders() if args.no_secrets else None)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    cfg = loaded.config
    print(
        f"{args.config}: ok ({len(cfg.tenants)} tenants, {len(cfg.models)} models, "
        f"{len(cfg.resources)} resources)"
        + (" — secrets not checked (--no-secrets)" if args.no_secrets else "")
    )
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    if not args.admin and not args.tenant:
        print("gateway keys new: give TENANT (or --admin for an admin key)", file=sys.stderr)
        return 2
    key = new_key()
    owner = "admin" if args.admin else args.tenant
    key_id = args.id or f"{owner}-{time.strftime('%Y%m%d')}-{os.urandom(2).hex()}"
    print(f"key: {key}")
    if args.admin:
        tenants = json.dumps(args.admin_of or ["*"])
        print("# Give the key to the admin once; it is not stored anywhere. Add this under")
        print('# admin.keys in the config (tenants: ["*"] for a gateway admin, or the tenants')
        print("# a tenant admin manages):")
        print(f'- {{id: {key_id}, sha256: "{hash_key(key)}", tenants: {tenants}}}')
        return 0
    print("# Give the key to the team once; it is not stored anywhere. Add this under")
    print(f"# tenants.{args.tenant}.keys in the config:")
    print(f'- {{id: {key_id}, sha256: "{hash_key(key)}"}}')
    return 0


def cmd_keys_which(args: argparse.Namespace) -> int:
    """Which config key (id, tenant) a key is, by its hash."""
    from .keys import KeyRing, digest_of

    try:
        loaded = load_config(args.config or os.environ.get("GATEWAY_CONFIG", ""))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        principal = KeyRing(loaded.config).lookup(digest_of(args.key))
    except GatewayError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    if principal is None:
        print("not a key of this config (keys made with the admin API: gateway admin keys list)")
        return 1
    print(f"id: {principal.key_id}\ntenant: {principal.tenant}")
    return 0


def _admin_call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One admin API call; the gateway from --url or GATEWAY_ADMIN_URL, the admin
    credential from GATEWAY_ADMIN_KEY."""
    import urllib.error
    import urllib.request

    key = os.environ.get("GATEWAY_ADMIN_KEY")
    if not key:
        raise SystemExit("gateway admin: set GATEWAY_ADMIN_KEY to an admin key")
    url = args.url or os.environ.get("GATEWAY_ADMIN_URL")
    if not url:
        raise SystemExit("gateway admin: give --url URL or set GATEWAY_ADMIN_URL")
    args.url = url
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]["message"]
        raise SystemExit(f"gateway admin: {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"gateway admin: cannot reach {args.url}: {exc.reason}") from None


_KEY_FIELDS = ("id", "tenant", "name", "source", "created_at", "expires_at", "last_used_at")


def _shown(value: Any) -> str:
    """A field as a person reads it: ``-`` for none, never a Python repr."""
    if value is None or value == {}:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _print_key(args: argparse.Namespace, row: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(row, indent=2))
        return
    for field in (*_KEY_FIELDS, "metadata"):
        print(f"{field + ':':<14}{_shown(row.get(field))}")
    if "key" in row:
        print(row["key"])  # the secret, on a line of its own, shown once


def cmd_admin_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"tenant": args.tenant, "name": args.name}
    if args.expires_at:
        body["expires_at"] = args.expires_at
    _print_key(args, _admin_call(args, "POST", "/admin/keys", body))
    return 0


def cmd_admin_list(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    query = f"?tenant={quote(args.tenant)}" if args.tenant else ""
    rows = _admin_call(args, "GET", "/admin/keys" + query)["data"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    fields = ("id", "tenant", "name", "source", "expires_at", "last_used_at")
    table = [list(fields), *([_shown(r.get(f)) for f in fields] for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(fields))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_admin_get(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    _print_key(args, _admin_call(args, "GET", f"/admin/keys/{quote(args.id, safe='')}"))
    return 0


def cmd_admin_rotate(args: argparse.Namespace) -> int:
    body = {"grace_seconds": args.grace_seconds}
    _print_key(args, _admin_call(args, "POST", f"/admin/keys/{args.id}/rotate", body))
    return 0


def cmd_admin_revoke(args: argparse.Namespace) -> int:
    row = _admin_call(args, "DELETE", f"/admin/keys/{args.id}")
    print(json.dumps(row) if args.json else f"revoked: {row['id']}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from .audit_sinks import verify

    count, problem = verify(args.files)
    if problem:
        print(f"FAILED after {count} good records: {problem}", file=sys.stderr)
        return 1
    print(f"ok: {count} records, chain intact across {len(args.files)} file(s)")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    import asyncio

    from .state.redis import RedisState
    from .state.sqlite import LedgerFile
    from .usage import UsageQueryError, render, report

    path = args.config or os.environ.get("GATEWAY_CONFIG")
    if not path:
        print("gateway usage: give --config FILE or set GATEWAY_CONFIG", file=sys.stderr)
        return 2
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    cfg = loaded.config
    if cfg.state.backend == "memory":
        print(
            "gateway usage: the memory backend keeps the ledger inside the running gateway; "
            "read it with GET /admin/usage (admin.key_sha256)",
            file=sys.stderr,
        )
        return 2

    async def run() -> str:
        if cfg.state.backend == "sqlite":
            rows = await report(LedgerFile(cfg.state.path), cfg, args.start, args.end, args.tenant)
            return render(rows, args.format)
        assert loaded.redis_url is not None
        state = RedisState(
            loaded.redis_url.value,
            timeout=max(cfg.state.timeout_seconds, 2.0),
            mode=cfg.state.mode,
        )
        try:
            await state.connect()
            rows = await report(state, cfg, args.start, args.end, args.tenant)
        finally:
            await state.aclose()
        return render(rows, args.format)

    try:
        sys.stdout.write(asyncio.run(run()))
    except UsageQueryError as exc:
        print(f"gateway usage: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"gateway usage: {exc.message}", file=sys.stderr)
        return 1
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulator import IDENTITY_HEADER, SimState, create_simulator

    setup_logging("WARNING")
    state = SimState()
    app = create_simulator(state)
    base = f"http://{args.host}:{args.port}"
    print(
        f"""Simulated Azure OpenAI on {base} (Responses, Files, conversations, vector stores,
containers, chat, embeddings, images, audio; /openai/v1 and ?api-version= paths).
It accepts either credential a gateway sends:
  - a resource key: in the gateway config, resources.NAME: {{endpoint: {base},
    auth: api_key, api_key_env: SIM_API_KEY}} and SIM_API_KEY={state.api_key}
  - an Entra token (managed identity): auth: entra, credential.type: managed_identity,
    IDENTITY_ENDPOINT={base}/msi/token IDENTITY_HEADER={IDENTITY_HEADER}
Ready to use: SIM_API_KEY={state.api_key} gateway serve --config config/local.yaml
Ctrl-C stops it.""",
        flush=True,
    )
    # Collector set up like the gateway's: the simulator is the "direct" baseline of the
    # benchmarks, and its full collections (it keeps 2,000 answers) were its p99.
    server = ServerConfig()
    tune_gc(server.gc_freeze, server.gc_thresholds)
    uvicorn.Server(_uvicorn_config(app, args.host, args.port, "warning")).run()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_config(sim_port: int, key: str, guarded_key: str | None = None) -> LoadedConfig:
    """A config on the local simulator via Entra: a tenant without guardrails and a model
    for every flow the README shows (Responses, chat, embeddings, audio, Realtime, batch),
    and a guarded tenant whose prompts and tool outputs the simulator's Content Safety
    checks."""
    guarded = {
        "guarded": {
            "keys": [{"id": "guarded-key", "sha256": hash_key(guarded_key or "")}],
            "models": ["gpt-4.1"],
            "guardrails": {"prompt_shield": True, "documents": True, "moderation": {"input": 4}},
        }
    }
    return parse_config(
        {
            "credential": {"type": "managed_identity"},
            "resources": {
                "sim-swc": {"endpoint": f"http://127.0.0.1:{sim_port}", "region": "swedencentral"}
            },
            "models": {
                "gpt-4.1": [
                    {"resource": "sim-swc", "deployment": "gpt-41-sim"},
                    {"resource": "sim-swc", "deployment": "gpt-41-batch", "batch": True},
                ],
                "text-embedding-3-small": [{"resource": "sim-swc", "deployment": "emb-sim"}],
                "gpt-4o-transcribe": [{"resource": "sim-swc", "deployment": "stt-sim"}],
                "gpt-realtime": [{"resource": "sim-swc", "deployment": "realtime-sim"}],
            },
            "tenants": {
                "demo": {
                    "keys": [{"id": "demo-key", "sha256": hash_key(key)}],
                    "models": [
                        "gpt-4.1",
                        "text-embedding-3-small",
                        "gpt-4o-transcribe",
                        "gpt-realtime",
                    ],
                },
                **(guarded if guarded_key else {}),
            },
            "content_safety": {
                "sim-cs": {"endpoint": f"http://127.0.0.1:{sim_port}", "region": "swedencentral"}
            },
        },
        environ={},
        source="<demo>",
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from .app import create_app
    from .simulator import IDENTITY_HEADER, create_simulator

    setup_logging("INFO")  # the access log: a JSON line per request, on stderr
    logging.getLogger("azure").setLevel(logging.WARNING)
    sim_port = args.sim_port or _free_port()
    sim = uvicorn.Server(_uvicorn_config(create_simulator(), "127.0.0.1", sim_port, "warning"))
    threading.Thread(target=sim.run, daemon=True, name="simulator").start()
    while not sim.started:
        time.sleep(0.02)
    # azure-identity's managed-identity flow, served by the simulator (App Service protocol).
    os.environ["IDENTITY_ENDPOINT"] = f"http://127.0.0.1:{sim_port}/msi/token"
    os.environ["IDENTITY_HEADER"] = IDENTITY_HEADER
    key, guarded_key = new_key(), new_key()
    loaded = demo_config(sim_port, key, guarded_key)
    state_path = loaded.config.state.path
    app = create_app(loaded)
    base = f"http://{args.host}:{args.port}"
    py = sys.executable  # the project's own venv (.venv/bin/python from scripts/demo.sh)
    line = (
        '{\\"custom_id\\": \\"1\\", \\"method\\": \\"POST\\", \\"url\\": '
        '\\"/v1/responses\\", \\"body\\": {\\"model\\": \\"gpt-4.1\\", '
        '\\"input\\": \\"Hi\\"}}'
    )
    print(
        f"""
Gateway demo: gateway on {base}, simulated Azure OpenAI on 127.0.0.1:{sim_port}.
Demo key (tenant 'demo', model 'gpt-4.1'): {key}
Guarded key (tenant 'guarded', Content Safety on prompts and tool outputs): {guarded_key}

  curl -s {base}/openai/v1/responses -H "api-key: {key}" \\
       -H "content-type: application/json" -d '{{"model": "gpt-4.1", "input": "Hello"}}'

  {py} -m pip install -q "openai[realtime]" && {py} -c '
from openai import OpenAI
client = OpenAI(base_url="{base}/openai/v1/", api_key="{key}")
print(client.responses.create(model="gpt-4.1", input="Hello").output_text)
f = client.files.create(file=("notes.pdf", b"%PDF-1.4 demo"), purpose="assistants")
parts = [{{"type": "input_file", "file_id": f.id}}, {{"type": "input_text", "text": "Summarise"}}]
print(client.responses.create(model="gpt-4.1",
    input=[{{"role": "user", "content": parts}}]).output_text)
print(client.chat.completions.create(model="gpt-4.1",
    messages=[{{"role": "user", "content": "Hi"}}]).choices[0].message.content)
print(len(client.embeddings.create(model="text-embedding-3-small", input="hi").data[0].embedding))
with client.realtime.connect(model="gpt-realtime") as rt:
    rt.response.create()
    text = ""
    for event in rt:
        text += getattr(event, "delta", "") if event.type == "response.output_text.delta" else ""
        if event.type == "response.done":
            break
    print(text)
batch_file = client.files.create(file=("b.jsonl", b"{line}"), purpose="batch")
print(client.batches.create(input_file_id=batch_file.id, endpoint="/v1/responses",
    completion_window="24h").status)'

With the guarded key, a prompt containing JAILBREAK-TEST is refused (400 content_filter),
as Azure's own content filter would; see docs/guardrails.md for the other markers.

The simulator serves Responses, Files, conversations, vector stores, containers, chat
completions, embeddings, images, audio, Realtime and batch jobs, on the /openai/v1 and
api-version paths. The access log (a JSON line per request) goes to stderr. The gateway's
state (who owns each id, runtime keys, spend) is kept in {os.path.abspath(state_path)}.

Ctrl-C stops both.
""",
        flush=True,
    )
    try:
        uvicorn.Server(_uvicorn_config(app, args.host, args.port, "warning")).run()
    finally:
        sim.should_exit = True
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", help="YAML config file (or set GATEWAY_CONFIG)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO: one access line per request)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "check", help="validate a config file: fields, cross-references, allowlists, regions"
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--no-secrets",
        action="store_true",
        help="check everything but the environment variables it names (for CI)",
    )
    p.set_defaults(func=cmd_check)

    keys = sub.add_parser("keys", help="manage gateway keys").add_subparsers(
        dest="keys", required=True
    )
    p = keys.add_parser("new", help="print a new key for TENANT (or an admin) and its entry")
    p.add_argument("tenant", nargs="?", help="the tenant the key is for")
    p.add_argument("--admin", action="store_true", help="an admin key (for admin.keys)")
    p.add_argument(
        "--admin-of",
        action="append",
        metavar="TENANT",
        help="with --admin: a tenant the admin manages (repeat; default: all)",
    )
    p.add_argument("--id", help="key id (default: TENANT-DATE-RANDOM)")
    p.set_defaults(func=cmd_keys_new)

    p = keys.add_parser("which", help="which config key (id, tenant) KEY is")
    p.add_argument("key", help="the key to look up (compared by its hash)")
    p.add_argument("--config", help="YAML config file (or set GATEWAY_CONFIG)")
    p.set_defaults(func=cmd_keys_which)

    admin = sub.add_parser(
        "admin", help="the admin API of a running gateway (GATEWAY_ADMIN_KEY: an admin key)"
    ).add_subparsers(dest="admin", required=True)
    admin_keys = admin.add_parser("keys", help="keys made at runtime").add_subparsers(
        dest="admin_keys", required=True
    )
    url_help = "the gateway's base URL, e.g. http://gateway:8080 (or GATEWAY_ADMIN_URL)"

    def admin_cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = admin_keys.add_parser(name, help=help_text)
        cmd.add_argument("--url", help=url_help)
        cmd.add_argument("--json", action="store_true", help="print the API's JSON")
        return cmd

    p = admin_cmd("create", "make a key; prints it once, on its own line")
    p.add_argument("--tenant", required=True, help="the tenant the key is for")
    p.add_argument("--name", required=True, help="what the key is for (e.g. ci, laptop-jane)")
    p.add_argument("--expires-at", help="RFC 3339 time with a zone, e.g. 2027-01-31T00:00:00Z")
    p.set_defaults(func=cmd_admin_create)
    p = admin_cmd("list", "list keys (config and API), never their secrets")
    p.add_argument("--tenant", help="one tenant (default: all the admin manages)")
    p.set_defaults(func=cmd_admin_list)
    p = admin_cmd("get", "one key (config or API), never its secret")
    p.add_argument("id", help="the key id")
    p.set_defaults(func=cmd_admin_get)
    p = admin_cmd("rotate", "give a key a new secret; prints it once")
    p.add_argument("id", help="the key id")
    p.add_argument(
        "--grace-seconds", type=int, default=0, help="how long the old secret still works"
    )
    p.set_defaults(func=cmd_admin_rotate)
    p = admin_cmd("revoke", "revoke a key on every replica")
    p.add_argument("id", help="the key id")
    p.set_defaults(func=cmd_admin_revoke)

    audit = sub.add_parser("audit", help="MCP audit trail tools").add_subparsers(
        dest="audit", required=True
    )
    p = audit.add_parser("verify", help="check the hash chain of audit files (oldest first)")
    p.add_argument("files", nargs="+", metavar="FILE", help="audit files, oldest first")
    p.set_defaults(func=cmd_audit_verify)

    p = sub.add_parser("usage", help="print the usage ledger (sqlite, Redis) as CSV or JSON")
    p.add_argument("--config", help="YAML config file (or set GATEWAY_CONFIG)")
    p.add_argument("--from", dest="start", required=True, help="first UTC day, YYYY-MM-DD")
    p.add_argument("--to", dest="end", required=True, help="last UTC day, YYYY-MM-DD")
    p.add_argument("--tenant", help="one tenant (default: all)")
    p.add_argument("--format", choices=["csv", "json"], default="csv", help="output format")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("simulate", help="serve the local Azure OpenAI simulator")
    p.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8081, help="port (default 8081)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="simulator + gateway on loopback with a fresh demo key")
    p.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    p.add_argument("--sim-port", type=int, default=0, help="simulator port (default: any free)")
    p.set_defaults(func=cmd_demo)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("azure-responses-gateway")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gateway`` command."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
