"""The tool and MCP policy reads every field through which a tool names what it calls,
in every tool list a request carries: a connector or tunnel next to an allowed
server_url must pass too; connectors and tunnels are their own allowlist entries."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from harness import Sim, Tenants, base_config, gateway
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import McpPolicyConfig, TenantConfig
from gateway.errors import Forbidden
from gateway.objects import Refs
from gateway.policy import check_tool_policy, mcp_server_allowed

ALLOW = McpPolicyConfig(
    allowed_servers=("https://mcp.example.com/*", "connector_sharepoint", "tunnel_0123*")
)


def _mcp(**fields: Any) -> dict[str, Any]:
    return {"type": "mcp", "server_label": "s", **fields}


@pytest.mark.parametrize(
    ("tool", "refused"),
    [
        (_mcp(server_url="https://mcp.example.com/a"), None),
        (_mcp(server_url="https://evil.example/a"), "server_url"),
        (_mcp(connector_id="connector_sharepoint"), None),
        (_mcp(connector_id="connector_gmail"), "connector_id"),
        # A connector next to an allowed URL: both must pass.
        (
            _mcp(server_url="https://mcp.example.com/a", connector_id="connector_gmail"),
            "connector_id",
        ),
        (_mcp(server_url="https://mcp.example.com/a", connector_id="connector_sharepoint"), None),
        (_mcp(tunnel_id="tunnel_0123" + "a" * 28), None),
        (_mcp(tunnel_id="tunnel_" + "b" * 32), "tunnel_id"),
        (_mcp(server_url="https://mcp.example.com/a", tunnel_id="tunnel_" + "b" * 32), "tunnel_id"),
        (_mcp(), "server_url"),  # names nothing the allowlist could admit
        (_mcp(server_url=["https://mcp.example.com/a"]), "server_url"),
    ],
)
def test_every_field_that_names_a_server_is_checked(
    tool: dict[str, Any], refused: str | None
) -> None:
    assert mcp_server_allowed(ALLOW, tool) == refused


def test_url_entries_never_admit_connectors_and_the_reverse() -> None:
    wide = McpPolicyConfig(allowed_servers=("*",))
    assert mcp_server_allowed(wide, _mcp(server_url="https://any.example/")) is None
    assert mcp_server_allowed(wide, _mcp(connector_id="connector_gmail")) == "connector_id"
    assert mcp_server_allowed(wide, _mcp(tunnel_id="tunnel_" + "c" * 32)) == "tunnel_id"
    connectors = McpPolicyConfig(allowed_servers=("connector_*",))
    assert mcp_server_allowed(connectors, _mcp(server_url="connector_gmail")) == "server_url"
    assert mcp_server_allowed(McpPolicyConfig(), _mcp(connector_id="connector_gmail")) is None


@given(
    url=st.sampled_from(["https://mcp.example.com/a", "https://evil.example/", None]),
    connector=st.sampled_from(["connector_sharepoint", "connector_gmail", None]),
    tunnel=st.sampled_from(["tunnel_0123" + "a" * 28, "tunnel_" + "b" * 32, None]),
)
def test_a_tool_passes_only_when_each_named_server_passes(
    url: str | None, connector: str | None, tunnel: str | None
) -> None:
    tool = _mcp(
        **{
            k: v
            for k, v in (("server_url", url), ("connector_id", connector), ("tunnel_id", tunnel))
            if v is not None
        }
    )
    good = [
        url in (None, "https://mcp.example.com/a"),
        connector in (None, "connector_sharepoint"),
        tunnel in (None, "tunnel_0123" + "a" * 28),
    ]
    named = any(v is not None for v in (url, connector, tunnel))
    assert (mcp_server_allowed(ALLOW, tool) is None) == (all(good) and named)


def _lists(body: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    refs = Refs()
    refs.body(body)
    return refs.tools


def test_tool_lists_anywhere_in_the_body_are_policed() -> None:
    """Tools defined in a namespace, in an additional_tools or tool_search_output input
    item, are tools like the top-level ones; tool_choice only names tools, and an
    mcp_list_tools item lists a server's tools: neither is policed as definitions."""
    tenant = TenantConfig(
        models=("*",), mcp=ALLOW, tools={"allowed": ["mcp", "namespace", "function"]}
    )
    bad = _mcp(server_url="https://evil.example/a")
    for body, param in (
        (
            {"input": [{"type": "additional_tools", "role": "developer", "tools": [bad]}]},
            "input[0].tools[0]",
        ),
        ({"input": [{"type": "tool_search_output", "tools": [bad]}]}, "input[0].tools[0]"),
        (
            {
                "tools": [
                    {"type": "namespace", "name": "n", "tools": [{"type": "custom", "name": "c"}]}
                ]
            },
            "tools[0].tools[0].type",
        ),
    ):
        with pytest.raises(Forbidden) as info:
            check_tool_policy("t", tenant, _lists(body))
        assert info.value.param == param
    fine = {
        "tool_choice": {
            "type": "allowed_tools",
            "mode": "auto",
            "tools": [{"type": "mcp", "server_label": "x"}],
        },
        "input": [
            {
                "type": "mcp_list_tools",
                "server_label": "x",
                "tools": [{"name": "a", "input_schema": {}}],
            }
        ],
    }
    assert _lists(fine) == []


def test_connectors_and_nested_tools_over_http(identity: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity}, tenants)
    cfg["tenants"]["team-a"]["mcp"] = {
        "allowed_servers": ["https://mcp.example.com/*", "connector_sharepoint"]
    }
    key = tenants.key("team-a")
    allowed_url = "https://mcp.example.com/docs"
    with gateway(cfg) as gw:

        def create(tools: list[Any] | None = None, **body: Any) -> httpx.Response:
            payload = {"model": "gpt-4.1", "input": "x", **body}
            if tools is not None:
                payload["tools"] = tools
            return httpx.post(
                gw.url + "/openai/v1/responses", json=payload, headers={"api-key": key}
            )

        r = create([_mcp(server_url=allowed_url, connector_id="connector_gmail")])
        assert r.status_code == 403 and r.json()["error"]["code"] == "mcp_server_not_allowed"
        assert "connector_id connector_gmail" in r.json()["error"]["message"]
        r = create(
            input=[
                {
                    "type": "additional_tools",
                    "role": "developer",
                    "tools": [_mcp(connector_id="connector_gmail")],
                }
            ]
        )
        assert r.status_code == 403 and r.json()["error"]["param"] == "input[0].tools[0]"
        assert identity.state.api_requests() == []
        assert (
            create([_mcp(server_url=allowed_url, connector_id="connector_sharepoint")]).status_code
            == 200
        )
