"""Before measuring: is the server there, does it serve the model, what does its stream carry?

`preflight()` raises `BenchError` with one line for an unreachable URL, a
refused API key or an unknown model, and otherwise returns `ServerInfo`:
- the model to use (the first of `/v1/models` when none was named);
- whether streams carry `usage` and per-token `logprobs`, learned from one
  short probe request (4 tokens). If the server rejects logprobs, the probe is
  retried without them. The probe's tokens are reported as unmeasured.
"""
from __future__ import annotations

from dataclasses import dataclass

import httpx

from tokenmill.bench.client import RequestRecord, StreamingClient, describe_http_error, error_message
from tokenmill.bench.config import BenchConfig, BenchError
from tokenmill.bench.workload import RequestSpec

PROBE = RequestSpec(max_tokens=4, prompt="The quick brown fox jumps over the lazy dog. Once upon a time",
                    messages=({"role": "user", "content": "Tell me a short story."},))


@dataclass
class ServerInfo:
    model: str
    served_models: list[str] | None
    usage: bool
    logprobs: bool
    probes: list[RequestRecord]


async def _list_models(config: BenchConfig) -> list[str] | None:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        async with httpx.AsyncClient(timeout=min(config.timeout, 30.0), trust_env=False) as http:
            response = await http.get(config.base_url.rstrip("/") + "/models", headers=headers)
    except httpx.InvalidURL as error:
        raise BenchError(f"invalid --base-url {config.base_url!r}: {error}") from None
    except httpx.ConnectError as error:
        raise BenchError(f"cannot reach {config.base_url}: could not connect ({describe_http_error(error)})") from None
    except (httpx.HTTPError, OSError) as error:
        raise BenchError(f"cannot reach {config.base_url}: {describe_http_error(error)}") from None
    if response.status_code in (401, 403):
        raise BenchError(f"{config.base_url} refused the request (HTTP {response.status_code}: "
                         f"{error_message(response.content)}); check --api-key")
    if response.status_code != 200:
        return None
    try:
        return [str(entry["id"]) for entry in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        return None


def _is_model_error(record: RequestRecord) -> bool:
    return record.failure == "http_404" or "model" in (record.failure_detail or "").lower()


async def _probe(config: BenchConfig, model: str, logprobs: bool) -> RequestRecord:
    client = StreamingClient(config.base_url, config.endpoint, model, api_key=config.api_key,
                             timeout=config.timeout, max_connections=1, temperature=config.temperature,
                             ignore_eos=config.ignore_eos, logprobs=logprobs, extra_body=config.extra_body)
    try:
        return await client.send(PROBE, -1)
    finally:
        await client.aclose()


async def preflight(config: BenchConfig) -> ServerInfo:
    served = await _list_models(config)
    model = config.model
    if model is None:
        if not served:
            raise BenchError(f"{config.base_url} does not list its models; name one with --model")
        model = served[0]
    want_logprobs = config.logprobs is not False
    probes = [await _probe(config, model, want_logprobs)]
    if probes[-1].failure in ("http_400", "http_422") and want_logprobs and not _is_model_error(probes[-1]):
        probes.append(await _probe(config, model, False))  # some servers reject logprobs outright
    probe = probes[-1]
    if probe.failure is not None:
        detail = probe.failure_detail or probe.failure
        if probe.failure in ("http_401", "http_403"):
            raise BenchError(f"{config.base_url} refused the request ({detail}); check --api-key")
        if probe.failure.startswith("http_") and _is_model_error(probe):
            listed = f"; it serves {', '.join(served)}" if served else ""
            raise BenchError(f"unknown model {model!r} at {config.base_url} "
                             f"(HTTP {probe.failure[5:]}: {detail}){listed}")
        if probe.failure == "connection":
            raise BenchError(f"cannot reach {config.base_url}: {detail}")
        raise BenchError(f"the probe request to {client_url(config)} failed: {probe.failure} ({detail})")
    return ServerInfo(model=model, served_models=served, usage=probe.usage_completion_tokens is not None,
                      logprobs=probe.saw_logprobs, probes=probes)


def client_url(config: BenchConfig) -> str:
    path = "/chat/completions" if config.endpoint == "chat" else "/completions"
    return config.base_url.rstrip("/") + path
