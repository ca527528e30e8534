"""Model aliases to pools, and the `auto` alias's choice between a small and a frontier model.

`auto` score (weights and markers from the config's `auto:` section):

    score = weights.prompt_per_1k_tokens * prompt_tokens / 1000
          + weights.max_tokens_per_1k   * max_tokens / 1000
          + weights.code                * (1 if any code marker occurs in the prompt)
          + weights.reasoning_per_marker * min(distinct reasoning markers found, weights.max_reasoning_markers)

The request goes to `auto.frontier` when score >= `auto.threshold`, else to
`auto.small`. Markers match case-insensitively anywhere in the prompt text.
A request header (`auto.header`, default `x-tokenmill-route`) of `small` or
`frontier` forces the choice; the score is still computed and reported. The
decision is returned in the `x-tokenmill-route` and `x-tokenmill-route-score`
response headers, recorded in the ledger (`route` = `auto:small` or
`auto:frontier`) and counted in `tokenmill_gateway_route_decisions_total`.

Prompt tokens are estimated as ceil(characters / 4) here and for reservations;
the upstream's usage settles the real count afterwards.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tokenmill.gateway.config import AUTO_MODEL, AutoConfig, GatewayConfig
from tokenmill.server.errors import APIError

CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class RouteDecision:
    alias: str          # the model alias that serves the request
    route: str          # what the ledger and metrics call the route
    score: float | None = None
    forced: bool = False


class AutoRouter:
    def __init__(self, config: AutoConfig) -> None:
        self.config = config
        self._code = self._pattern(config.code_markers)
        self._reasoning = self._pattern(config.reasoning_markers)

    @staticmethod
    def _pattern(markers: list[str]) -> re.Pattern | None:
        markers = [m for m in markers if m]
        if not markers:
            return None
        return re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)), re.IGNORECASE)

    def score(self, prompt_text: str, prompt_tokens: int, max_tokens: int) -> float:
        weights = self.config.weights
        value = weights.prompt_per_1k_tokens * prompt_tokens / 1000 + weights.max_tokens_per_1k * max_tokens / 1000
        if self._code is not None and self._code.search(prompt_text):
            value += weights.code
        if self._reasoning is not None and weights.max_reasoning_markers:
            found = set()
            for match in self._reasoning.finditer(prompt_text):
                found.add(match.group(0).lower())
                if len(found) >= weights.max_reasoning_markers:
                    break
            value += weights.reasoning_per_marker * len(found)
        return round(value, 4)

    def decide(self, prompt_text: str, prompt_tokens: int, max_tokens: int, header: str | None) -> RouteDecision:
        score = self.score(prompt_text, prompt_tokens, max_tokens)
        if header is not None:
            choice = header.strip().lower()
            if choice not in ("small", "frontier"):
                raise APIError(400, f"the {self.config.header} header must be 'small' or 'frontier', "
                                    f"got {header!r}", param=self.config.header, code="invalid_route")
            forced = True
        else:
            choice = "frontier" if score >= self.config.threshold else "small"
            forced = False
        alias = self.config.frontier if choice == "frontier" else self.config.small
        return RouteDecision(alias=alias, route=f"{AUTO_MODEL}:{choice}", score=score, forced=forced)


class Router:
    """Resolves the model a client asked for to the alias that serves it."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.auto = AutoRouter(config.auto) if config.auto is not None else None

    def resolve(self, model: str, prompt_text: str, prompt_tokens: int, max_tokens: int,
                headers) -> RouteDecision:
        if model == AUTO_MODEL and self.auto is not None:
            return self.auto.decide(prompt_text, prompt_tokens, max_tokens, headers.get(self.auto.config.header))
        if model not in self.config.models:
            raise APIError(404, f"the model {model!r} does not exist; this gateway serves: "
                                f"{', '.join(self.config.aliases)}", "not_found_error", param="model",
                           code="model_not_found")
        return RouteDecision(alias=model, route=model)
