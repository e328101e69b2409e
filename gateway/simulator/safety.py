"""Azure AI Content Safety, simulated: Prompt Shields (``text:shieldPrompt``) and text
moderation (``text:analyze``) with Azure's request and response shapes and limits, and
verdicts decided by marker strings in the text, so tests and the demo can provoke each:

- ``JAILBREAK-TEST`` in ``userPrompt`` → ``userPromptAnalysis.attackDetected``;
- ``INDIRECT-ATTACK-TEST`` in a document → that document's ``attackDetected``;
- ``[[Hate:6]]`` (any of Hate, SelfHarm, Sexual, Violence; severity 0-7) in the text of
  ``text:analyze`` → that category at that severity (with ``EightSeverityLevels``; the
  default ``FourSeverityLevels`` rounds down to 0, 2, 4, 6 as Azure does).

``SimState.safety_delay`` delays every answer, ``safety_fail_queue`` makes the next calls
fail with those statuses; every call is recorded in ``SimState.requests``.
"""

from __future__ import annotations

import asyncio
import json
import re

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .base import Ctx, Recorded

CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
_MARK = re.compile(r"\[\[(Hate|SelfHarm|Sexual|Violence):([0-7])\]\]")
API_VERSIONS = ("2024-09-01", "2024-02-15-preview", "2023-10-01")


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": {"code": code, "message": message}}, status)


def routes(ctx: Ctx) -> list[Route]:
    sim = ctx.sim

    async def accept(request: Request) -> tuple[dict[str, object] | None, Response | None]:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        sim.requests.append(
            Recorded(request.method, request.url.path, request.url.query, headers, body)
        )
        auth = headers.get("authorization", "")
        if not (
            auth.startswith("Bearer sim-token-")
            or headers.get("ocp-apim-subscription-key") == sim.api_key
        ):
            return None, _error(401, "PermissionDenied", "Access denied due to invalid key.")
        if request.query_params.get("api-version") not in API_VERSIONS:
            return None, _error(404, "NotFound", "Resource not found (api-version).")
        if sim.safety_delay:
            await asyncio.sleep(sim.safety_delay)
        if sim.safety_fail_queue:
            status = sim.safety_fail_queue.pop(0)
            resp = _error(status, str(status), f"Simulated Content Safety error {status}.")
            if status == 429:
                resp.headers["retry-after"] = "1"
            return None, resp
        try:
            parsed = json.loads(body)
        except ValueError:
            return None, _error(400, "InvalidRequestBody", "The body is not JSON.")
        if not isinstance(parsed, dict):
            return None, _error(400, "InvalidRequestBody", "The body must be an object.")
        return parsed, None

    async def shield(request: Request) -> Response:
        body, refused = await accept(request)
        if refused is not None:
            return refused
        assert body is not None
        prompt = body.get("userPrompt", "")
        documents = body.get("documents", [])
        if not isinstance(prompt, str) or not isinstance(documents, list):
            return _error(400, "InvalidRequestBody", "userPrompt: string, documents: list.")
        if not all(isinstance(d, str) for d in documents):
            return _error(400, "InvalidRequestBody", "Each document is a string.")
        if len(prompt) > 10_000 or len(documents) > 5:
            return _error(400, "InvalidRequestBody", "At most 10,000 characters, 5 documents.")
        if len(prompt) + sum(len(d) for d in documents) > 10_000:
            return _error(400, "InvalidRequestBody", "At most 10,000 characters in all.")
        return JSONResponse(
            {
                "userPromptAnalysis": {"attackDetected": "JAILBREAK-TEST" in prompt},
                "documentsAnalysis": [
                    {"attackDetected": "INDIRECT-ATTACK-TEST" in d} for d in documents
                ],
            }
        )

    async def analyze(request: Request) -> Response:
        body, refused = await accept(request)
        if refused is not None:
            return refused
        assert body is not None
        text = body.get("text")
        if not isinstance(text, str) or not text:
            return _error(400, "InvalidRequestBody", "text is required.")
        if len(text) > 10_000:
            return _error(400, "InvalidRequestBody", "At most 10,000 characters.")
        eight = body.get("outputType") == "EightSeverityLevels"
        severity = dict.fromkeys(CATEGORIES, 0)
        for category, level in _MARK.findall(text):
            severity[category] = max(severity[category], int(level))
        return JSONResponse(
            {
                "blocklistsMatch": [],
                "categoriesAnalysis": [
                    {"category": c, "severity": s if eight else s // 2 * 2}
                    for c, s in severity.items()
                ],
            }
        )

    return [
        Route("/contentsafety/text:shieldPrompt", shield, methods=["POST"]),
        Route("/contentsafety/text:analyze", analyze, methods=["POST"]),
    ]
