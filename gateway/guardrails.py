"""Guardrails: Azure AI Content Safety on what a request carries, one rule of the rulebook
(``checks.commit`` calls ``Guard.check_request`` for every transport, before anything goes
upstream).

What is checked (``tenants.NAME.guardrails``, else ``defaults.guardrails``):

- ``prompt_shield``: user prompts (``input`` as a string; user-role messages' string
  ``content`` and ``input_text`` parts; a Realtime ``conversation.item.create`` item and a
  ``response.create``'s ``input``) → Prompt Shields ``userPrompt``;
- ``documents``: what tools said (``function_call_output``, ``custom_tool_call_output``,
  ``local_shell_call_output`` and ``mcp_call`` outputs, ``mcp_approval_response`` reasons)
  → Prompt Shields ``documents``;
- ``moderation.input``: the user prompts → ``text:analyze`` (``EightSeverityLevels``),
  refused at the threshold or above.

Every item of the request's ``input`` is checked each time it is sent: with
``previous_response_id`` earlier turns are not in the body, and a client that replays its
history sends it to be checked again (the gateway cannot tell a replayed item from a new
one without trusting the client). Texts are cut to the API's limits (a prompt ≤ 10,000
characters; ≤ 5 documents and 10,000 characters per call; overlapping by 64 characters
where cut) and the calls run concurrently. A tenant's text goes only to a Content Safety
resource in its allowed regions (config order; the next while the first's breaker is
open). Audio and images are not checked (Content Safety's text APIs read text).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from .breaker import Breakers
from .config import Config, GuardrailsConfig, LoadedConfig, TenantConfig, guardrails_of, region_ok
from .errors import BadRequest, GatewayError, ServiceUnavailable

log = logging.getLogger("gateway.guardrails")

API_VERSION = "2024-09-01"
LIMIT = 10_000  # characters per prompt, per call's documents, per text:analyze
MAX_DOCUMENTS = 5
OVERLAP = 64
CATEGORY_NAMES = {
    "Hate": "hate",
    "Sexual": "sexual",
    "Violence": "violence",
    "SelfHarm": "self_harm",
}
Part = tuple[str, str]  # (param, text)
Record = dict[str, Any]


class ContentFiltered(BadRequest):
    """A refusal shaped like Azure's own content filter (400 ``content_filter``)."""

    code = "content_filter"
    records: list[Record] = []  # the verdicts of the refused request, for the audit trail

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, param=param, headers=headers)
        self.result = result or {}

    def body(self) -> bytes:
        err = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "source": "gateway",
                "content_filter_result": self.result,
            },
        }
        return json.dumps({"error": err}).encode()


class GuardrailUnavailable(ServiceUnavailable):
    code = "guardrail_unavailable"
    records: list[Record] = []  # the verdicts of the refused request, for the audit trail


def severity_label(severity: int) -> str:
    """Azure's labels for the eight levels: 0-1 safe, 2-3 low, 4-5 medium, 6-7 high."""
    return ("safe", "low", "medium", "high")[min(severity, 7) // 2]


def _chunks(text: str) -> list[str]:
    """``text`` cut to LIMIT characters, consecutive pieces overlapping by OVERLAP."""
    if len(text) <= LIMIT:
        return [text]
    step = LIMIT - OVERLAP
    return [text[i : i + LIMIT] for i in range(0, len(text) - OVERLAP, step)]


def _text_parts(content: Any, where: str, kinds: tuple[str, ...]) -> list[Part]:
    if isinstance(content, str):
        return [(where, content)] if content else []
    out: list[Part] = []
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in kinds:
                text = part.get("text")
                if isinstance(text, str) and text:
                    out.append((f"{where}[{j}].text", text))
    return out


def _item(item: Any, where: str, prompts: list[Part], documents: list[Part]) -> None:
    if not isinstance(item, dict):
        return
    kind = item.get("type")
    if kind in (None, "message") and item.get("role") == "user":
        prompts += _text_parts(item.get("content"), f"{where}.content", ("input_text",))
    elif kind in (
        "function_call_output",
        "custom_tool_call_output",
        "local_shell_call_output",
        "mcp_call",
    ):
        documents += _text_parts(item.get("output"), f"{where}.output", ("input_text",))
    elif kind == "mcp_approval_response":
        reason = item.get("reason")
        if isinstance(reason, str) and reason:
            documents.append((f"{where}.reason", reason))


def parts(body: dict[str, Any] | None) -> tuple[list[Part], list[Part]]:
    """(user prompts, documents) a request body or client event carries, with params."""
    prompts: list[Part] = []
    documents: list[Part] = []
    if not isinstance(body, dict):
        return prompts, documents
    for prefix, holder in (("", body), ("response.", body.get("response"))):
        if not isinstance(holder, dict):
            continue
        given = holder.get("input")
        if isinstance(given, str) and given:
            prompts.append((prefix + "input", given))
        elif isinstance(given, list):
            for i, item in enumerate(given):
                _item(item, f"{prefix}input[{i}]", prompts, documents)
    if body.get("type") == "conversation.item.create":
        _item(body.get("item"), "item", prompts, documents)
    return prompts, documents


class Guard:
    """Content Safety calls for every tenant: the resource per tenant, breakers, verdicts."""

    def __init__(
        self,
        loaded_source: Callable[[], LoadedConfig],
        tokens: Any,
        on_verdict: Callable[[str, str, str, float], None] | None = None,
    ) -> None:
        self._loaded = loaded_source
        self._tokens = tokens
        self._on_verdict = on_verdict
        self._session: aiohttp.ClientSession | None = None
        self.breakers = Breakers(loaded_source().config.breaker)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _resources(self, cfg: Config, tenant: TenantConfig) -> list[str]:
        return [n for n, cs in cfg.content_safety.items() if region_ok(tenant, cs.region)]

    # -- one call -----------------------------------------------------------------------

    async def _call(self, name: str, path: str, payload: dict[str, Any], seconds: float) -> Any:
        loaded = self._loaded()
        cs = loaded.config.content_safety[name]
        headers = {"content-type": "application/json"}
        key = loaded.resource_keys.get(f"content_safety.{name}")
        if cs.auth == "api_key" and key is not None:
            headers["ocp-apim-subscription-key"] = key.value
        else:
            headers["authorization"] = f"Bearer {await self._tokens.token(cs.scope)}"
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = f"{cs.endpoint}/contentsafety/{path}?api-version={API_VERSION}"
        async with self._session.post(
            url, data=json.dumps(payload), headers=headers, timeout=aiohttp.ClientTimeout(seconds)
        ) as resp:
            body = await resp.read()
            if resp.status >= 400:
                retry = resp.headers.get("retry-after")
                raise _Failed(resp.status, float(retry) if retry and retry.isdigit() else None)
            return json.loads(body)

    async def _on_any(
        self, names: list[str], path: str, payload: dict[str, Any], seconds: float
    ) -> Any:
        """The call on the first resource whose breaker lets it through, next on failure."""
        tried = False
        for name in names:
            key = f"cs:{name}"
            if not self.breakers.acquire(key):
                continue
            tried = True
            try:
                answer = await asyncio.wait_for(self._call(name, path, payload, seconds), seconds)
            except _Failed as exc:
                self.breakers.failure(key, exc.status, exc.retry_after)
                continue
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError, GatewayError):
                self.breakers.failure(key, None, None)
                continue
            self.breakers.success(key)
            return answer
        keys = [f"cs:{n}" for n in names]
        until, _ = self.breakers.reopens_at(keys) if keys else (time.time(), False)
        raise _Unavailable(max(1.0, until - time.time()), tried)

    # -- the rule ---------------------------------------------------------------------

    async def check_request(
        self, tenant_name: str, tenant: TenantConfig, body: dict[str, Any] | None
    ) -> list[Record]:
        """Check what ``body`` carries for ``tenant``: the verdict records (for the audit
        trail), or raise ``ContentFiltered`` / ``GuardrailUnavailable`` (carrying them)."""
        cfg = self._loaded().config
        guard = guardrails_of(cfg, tenant)
        if guard is None or not guard.inputs:
            return []
        prompts, documents = parts(body)
        if not prompts and not documents:
            return []
        names = self._resources(cfg, tenant)
        calls: list[tuple[str, list[str], Any]] = []  # (check, params, coroutine)
        if guard.prompt_shield:
            for param, text in prompts:
                for piece in _chunks(text):
                    payload = {"userPrompt": piece, "documents": []}
                    calls.append(("prompt_shield", [param], (payload, "text:shieldPrompt")))
        if guard.documents:
            for batch in _pack(documents):
                payload = {"userPrompt": "", "documents": [t for _, t in batch]}
                calls.append(("documents", [p for p, _ in batch], (payload, "text:shieldPrompt")))
        if guard.moderation.input is not None:
            for param, text in prompts:
                for piece in _chunks(text):
                    payload = {"text": piece, "outputType": "EightSeverityLevels"}
                    calls.append(("moderation_input", [param], (payload, "text:analyze")))
        if not calls:
            return []
        results = await asyncio.gather(
            *(self._timed(names, spec, guard) for _, _, spec in calls), return_exceptions=True
        )
        return self._verdicts(tenant_name, guard, calls, results)

    async def _timed(
        self, names: list[str], spec: tuple[dict[str, Any], str], guard: GuardrailsConfig
    ) -> tuple[Any, float]:
        started = time.perf_counter()
        payload, path = spec
        answer = await self._on_any(names, path, payload, guard.timeout_seconds)
        return answer, time.perf_counter() - started

    def _verdicts(
        self,
        tenant_name: str,
        guard: GuardrailsConfig,
        calls: list[tuple[str, list[str], Any]],
        results: list[Any],
    ) -> list[Record]:
        records: list[Record] = []
        blocked: ContentFiltered | None = None
        unavailable: _Unavailable | None = None
        for (check, params, _), result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, _Unavailable):
                    log.error("guardrail call failed", extra={"reason": repr(result)})
                    result = _Unavailable(1.0, True)
                unavailable = unavailable or result
                verdict = "skipped" if guard.on_error == "open" else "error"
                for param in params:
                    records.append(_record(param, check, verdict, [], 0.0))
                self._count(tenant_name, check, verdict, 0.0)
                continue
            answer, seconds = result
            flags = _flags(check, answer, guard, len(params))
            for param, (hit, categories, result_body) in zip(params, flags, strict=True):
                verdict = "block" if hit else "pass"
                records.append(_record(param, check, verdict, categories, seconds))
                self._count(tenant_name, check, verdict, seconds)
                if hit and blocked is None:
                    what = ", ".join(result_body)
                    blocked = ContentFiltered(
                        f"The request was refused by the gateway's content filter ({what} in"
                        f" '{param}'). Change that part and send it again.",
                        param=param,
                        result=result_body,
                    )
        if blocked is not None:
            blocked.records = records
            raise blocked
        if unavailable is not None and guard.on_error == "closed":
            error = GuardrailUnavailable(
                "The content safety check could not be made, so the request was not"
                " forwarded. Retry after the time in retry-after.",
                headers={"retry-after": str(max(1, round(unavailable.retry_after)))},
            )
            error.records = records
            raise error
        return records

    def _count(self, tenant: str, check: str, verdict: str, seconds: float) -> None:
        if self._on_verdict is not None:
            self._on_verdict(tenant, check, verdict, seconds)


def _pack(documents: list[Part]) -> list[list[Part]]:
    """Documents cut and packed: at most MAX_DOCUMENTS and LIMIT characters per call."""
    pieces = [(param, piece) for param, text in documents for piece in _chunks(text)]
    batches: list[list[Part]] = []
    size = 0
    for param, piece in pieces:
        if not batches or len(batches[-1]) >= MAX_DOCUMENTS or size + len(piece) > LIMIT:
            batches.append([])
            size = 0
        batches[-1].append((param, piece))
        size += len(piece)
    return batches


def _flags(
    check: str, answer: Any, guard: GuardrailsConfig, n: int
) -> list[tuple[bool, list[dict[str, Any]], dict[str, Any]]]:
    """Per checked part: (refused, categories for the audit, content_filter_result)."""
    if check == "prompt_shield":
        hit = bool((answer.get("userPromptAnalysis") or {}).get("attackDetected"))
        return [(hit, [], {"jailbreak": {"detected": True, "filtered": True}})]
    if check == "documents":
        docs = answer.get("documentsAnalysis") or []
        out: list[tuple[bool, list[dict[str, Any]], dict[str, Any]]] = []
        for i in range(n):
            hit = i < len(docs) and bool(docs[i].get("attackDetected"))
            out.append((hit, [], {"indirect_attack": {"detected": True, "filtered": True}}))
        return out
    threshold = guard.moderation.input
    assert threshold is not None
    categories = []
    result: dict[str, Any] = {}
    for entry in answer.get("categoriesAnalysis") or []:
        name = CATEGORY_NAMES.get(entry.get("category"), str(entry.get("category")))
        severity = int(entry.get("severity") or 0)
        categories.append({"category": name, "severity": severity})
        if severity >= threshold:
            result[name] = {"filtered": True, "severity": severity_label(severity)}
    return [(bool(result), categories, result)]


def _record(
    part: str, check: str, verdict: str, categories: list[dict[str, Any]], seconds: float
) -> Record:
    return {
        "part": part,
        "check": check,
        "verdict": verdict,
        "categories": categories,
        "latency_ms": round(seconds * 1000, 1),
    }


class _Failed(Exception):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


class _Unavailable(Exception):
    def __init__(self, retry_after: float, tried: bool) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after
        self.tried = tried
