"""Every tenant rule the rulebook applies: model allowlists (exact names and ``*`` globs),
tool types, and the MCP policy (servers, connectors and tunnels, the approval rewrite).

The rules read what the request names wherever it names it: every tool list a body
carries (``tools``, a namespace's ``tools``, an ``additional_tools`` or
``tool_search_output`` input item's ``tools``, a Realtime session's or response's
``tools``), collected by the one walk over the body (``objects.Refs``), and every field
through which an MCP tool names what it calls (``server_url``, ``connector_id``,
``tunnel_id``): a tool naming several must pass each.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from .config import McpPolicyConfig, TenantConfig
from .errors import Forbidden

Record = dict[str, Any]
# What an MCP tool may name to say what it calls, and the prefix of the allowlist entries
# that may admit it (None: the URL entries, those naming neither prefix).
MCP_TARGETS = (("server_url", None), ("connector_id", "connector_"), ("tunnel_id", "tunnel_"))
_ID_PREFIXES = tuple(p for _, p in MCP_TARGETS if p)
ToolLists = list[tuple[str, list[Any]]]  # (param path of the list, the list)


def model_allowed(tenant: TenantConfig, model: str) -> bool:
    """Whether any of the tenant's model patterns matches ``model``."""
    return any(fnmatchcase(model, pattern) for pattern in tenant.models)


def check_model(tenant_name: str, tenant: TenantConfig, model: str, where: str = "model") -> None:
    """Raise 403 ``model_not_allowed`` unless the tenant may use ``model``."""
    if not model_allowed(tenant, model):
        raise Forbidden(
            f"Tenant '{tenant_name}' is not allowed to use model '{model}' "
            f"(named in {where}); allowed: {', '.join(tenant.models) or 'none'}.",
            code="model_not_allowed",
            param=where,
        )


def check_tool_policy(tenant_name: str, tenant: TenantConfig, lists: ToolLists) -> list[Record]:
    """The whole tool policy of one request, over every tool list it carries: the tenant's
    tool types (403 ``tool_not_allowed``), then its MCP servers, connectors and tunnels
    (403 ``mcp_server_not_allowed``) and approval rule. Returns the approval rewrites made
    in place (each becomes an ``mcp.policy`` audit record)."""
    decisions: list[Record] = []
    for param, tools in lists:
        _check_types(tenant_name, tenant, param, tools)
    for param, tools in lists:
        decisions += _check_mcp(tenant_name, tenant.mcp, param, tools)
    return decisions


def _check_types(tenant_name: str, tenant: TenantConfig, param: str, tools: list[Any]) -> None:
    allowed = tenant.tools.allowed
    if allowed is None:
        return
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in allowed:
            raise Forbidden(
                f"Tenant '{tenant_name}' may not use tools of type '{kind}' ({param}[{i}]); "
                f"allowed: {', '.join(allowed) or 'none'}.",
                code="tool_not_allowed",
                param=f"{param}[{i}].type",
            )


def server_fields(tool: dict[str, Any]) -> Record:
    """What an MCP tool names as its server (for records and messages)."""
    return {name: tool.get(name) for name, _ in MCP_TARGETS if tool.get(name) is not None}


def mcp_server_allowed(policy: McpPolicyConfig, tool: dict[str, Any]) -> str | None:
    """None when the tenant's MCP allowlist admits every server ``tool`` names; else the
    field that is refused. URLs match URL entries only, connector and tunnel ids match
    entries of their own prefix only (so ``https://*`` never admits a connector)."""
    if policy.allowed_servers is None:
        return None
    named = False
    for name, prefix in MCP_TARGETS:
        value = tool.get(name)
        if value is None:
            continue
        named = True
        entries = [
            e
            for e in policy.allowed_servers
            if (e.startswith(prefix) if prefix else not e.startswith(_ID_PREFIXES))
        ]
        if not isinstance(value, str) or not any(fnmatchcase(value, e) for e in entries):
            return name
    return None if named else "server_url"


def _check_mcp(
    tenant_name: str, policy: McpPolicyConfig, param: str, tools: list[Any]
) -> list[Record]:
    """Refuse MCP servers outside the allowlist (403); rewrite each MCP tool's
    ``require_approval`` to ``always`` when the tenant's policy demands it."""
    decisions: list[Record] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "mcp":
            continue
        refused = mcp_server_allowed(policy, tool)
        if refused is not None:
            label = tool.get("server_label")
            named = tool.get(refused)
            shown = f"{refused} {named}" if named is not None else "no server_url"
            raise Forbidden(
                f"MCP server '{label}' ({shown}) is not allowed for tenant '{tenant_name}'.",
                code="mcp_server_not_allowed",
                param=f"{param}[{i}]",
            )
        if policy.require_approval == "always" and tool.get("require_approval") != "always":
            decisions.append(
                {
                    "event": "mcp.policy",
                    "action": "require_approval_rewritten",
                    "from": tool.get("require_approval", "default"),  # redacted when written
                    "to": "always",
                    "server_label": tool.get("server_label"),
                    **server_fields(tool),
                }
            )
            tools[i] = {**tool, "require_approval": "always"}
    return decisions
