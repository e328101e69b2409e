"""Price table → the cost of one exchange, from Azure's usage or the cut-stream estimate.

Prices are per 1M tokens. Cached tokens are the part of ``input_tokens`` that
``input_tokens_details.cached_tokens`` names, priced at ``cached_input`` (default: the
input price); reasoning tokens are part of ``output_tokens``, priced at ``reasoning``
when given (default: the output price). A resource may override a model's prices (a PTU
deployment: 0 per token). A stream cut before its usage arrived is priced from the
estimate (request bytes / 4 as input, one output token per event) and flagged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .config import Config, PriceConfig, TokenPrices
from .state import LedgerEntry

if TYPE_CHECKING:
    from .exchange import Exchange


class Cost(NamedTuple):
    amount: float
    currency: str
    estimated: bool


def price_tokens(
    p: TokenPrices,
    input_tokens: int,
    cached: int,
    output: int,
    reasoning: int,
    audio_in: int = 0,
    audio_out: int = 0,
) -> float:
    """The cost of these token counts at prices ``p`` (per 1M tokens). Audio tokens
    (Realtime) are part of the input and output counts, priced apart when the table
    gives ``audio_input``/``audio_output``."""
    cached = min(max(cached, 0), input_tokens)
    audio_in = min(max(audio_in, 0), input_tokens - cached)
    reasoning = min(max(reasoning, 0), output)
    audio_out = min(max(audio_out, 0), output - reasoning)
    cached_price = p.input if p.cached_input is None else p.cached_input
    reasoning_price = p.output if p.reasoning is None else p.reasoning
    audio_in_price = p.input if p.audio_input is None else p.audio_input
    audio_out_price = p.output if p.audio_output is None else p.audio_output
    total = (
        (input_tokens - cached - audio_in) * p.input
        + cached * cached_price
        + audio_in * audio_in_price
        + (output - reasoning - audio_out) * p.output
        + reasoning * reasoning_price
        + audio_out * audio_out_price
    )
    return total / 1_000_000


def batch_prices(p: TokenPrices) -> TokenPrices:
    """The prices of a batch job's tokens: ``batch_input``/``batch_cached_input``/
    ``batch_output`` where given, else the interactive price times ``batch_discount``."""
    d = p.batch_discount
    cached = p.input if p.cached_input is None else p.cached_input
    reasoning = p.output if p.reasoning is None else p.reasoning
    output = p.output * d if p.batch_output is None else p.batch_output
    return p.model_copy(
        update={
            "input": p.input * d if p.batch_input is None else p.batch_input,
            "cached_input": cached * d if p.batch_cached_input is None else p.batch_cached_input,
            "output": output,
            "reasoning": reasoning * d if p.batch_output is None else p.batch_output,
            "audio_input": None,
            "audio_output": None,
        }
    )


def cost_of(
    price: PriceConfig,
    resource: str | None,
    kinds: dict[str, int],
    estimated: bool = False,
    batch: bool = False,
) -> Cost:
    """The cost of one exchange's token ``kinds`` (from usage, or ``estimated``); of a
    batch job's at the batch prices."""
    p: TokenPrices = price.resources.get(resource or "", price)
    if batch:
        p = batch_prices(p)
    amount = price_tokens(
        p,
        kinds["input"],
        kinds["cached"],
        kinds["output"],
        kinds["reasoning"],
        kinds.get("audio_input", 0),
        kinds.get("audio_output", 0),
    )
    return Cost(amount, price.currency, estimated)


def billed_kinds(ex: Exchange) -> dict[str, int] | None:
    """The token counts an exchange is billed for: Azure's usage, or for a stream cut
    before it, the estimate (request bytes / 4 as input, the rest as output)."""
    kinds = ex.usage_kinds()
    if kinds is not None:
        return kinds
    if not ex.estimated_tokens:
        return None
    tokens_in = min(ex.request_bytes // 4, ex.estimated_tokens)
    return {
        "input": tokens_in,
        "cached": 0,
        "output": ex.estimated_tokens - tokens_in,
        "reasoning": 0,
    }


def bill(ex: Exchange, config: Config) -> LedgerEntry | None:
    """Price an ending exchange (``ex.cost``) from the price table; its usage-ledger
    entry (None: nothing billed, or no ledger)."""
    kinds = billed_kinds(ex)
    if kinds is None:
        return None
    resource = ex.target.resource if ex.target else None
    price = config.prices.get(ex.model or "")
    if price is not None:
        ex.cost, ex.currency, ex.cost_estimated = cost_of(price, resource, kinds, not ex.usage)
    if not config.usage.ledger or ex.tenant is None:
        return None
    return LedgerEntry.of(
        ex.tenant,
        ex.model or "",
        resource or "",
        kinds,
        ex.cost or 0.0,
        not ex.usage,
        config.usage.retention_days,
    )
