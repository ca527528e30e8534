"""`GatewayConfig`: the gateway's YAML file, validated into frozen pydantic models.

Every field is documented in `docs/gateway.md` (config reference) and shown in
`deploy/gateway/gateway.example.yaml`. `load_config(path)` is the one entry point:
it reads the file, validates it and resolves the secrets named by `*_env` fields
from the environment (a key is never written in the file). Any problem raises
`ConfigError` with the offending field's dotted path, e.g.
`pools.small.upstreams.0.base_url: must start with http:// or https://`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

AUTO_MODEL = "auto"


class ConfigError(ValueError):
    """A bad gateway config; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def default_database_url() -> str:
    """A SQLite file in the platform's per-user data folder (e.g. ~/.local/share/tokenmill)."""
    import platformdirs

    return "sqlite:///" + str(Path(platformdirs.user_data_dir("tokenmill")) / "gateway.db")


class ListenConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class UpstreamConfig(_Section):
    """One replica or API endpoint. `base_url` is the OpenAI base URL, ending in `/v1`
    (requests go to `{base_url}/chat/completions`); the health and metrics paths
    are taken from the server root (`scheme://host:port`)."""
    base_url: str
    api_key_env: str | None = None
    weight: float = Field(1.0, gt=0)
    name: str | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"must not carry a query or fragment: {value!r}")
        return value.rstrip("/")

    @property
    def origin(self) -> str:
        parts = urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def label(self) -> str:
        """How metrics and the ledger name this upstream: its `name`, else host:port."""
        return self.name or urlsplit(self.base_url).netloc


class CostConfig(_Section):
    """USD cost attribution: API token prices, or a self-hosted replica's GPU price
    split among the requests it serves at once (docs/gateway.md, Cost)."""
    price_per_1m_input: float = Field(0.0, ge=0)
    price_per_1m_output: float = Field(0.0, ge=0)
    gpu_hourly_usd: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _one_rule(self) -> CostConfig:
        if self.gpu_hourly_usd > 0 and (self.price_per_1m_input > 0 or self.price_per_1m_output > 0):
            raise ValueError("give token prices (price_per_1m_input/output) or gpu_hourly_usd, not both")
        return self


class TimeoutConfig(_Section):
    connect_s: float = Field(5.0, gt=0)
    first_token_s: float = Field(60.0, gt=0)
    total_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> TimeoutConfig:
        if self.first_token_s > self.total_s:
            raise ValueError(f"first_token_s ({self.first_token_s}) must not exceed total_s ({self.total_s})")
        return self


class QueueConfig(_Section):
    max_queue: int = Field(1024, ge=0)
    max_concurrent_per_upstream: int = Field(64, ge=1)
    max_wait_s: float = Field(60.0, gt=0)


class HealthConfig(_Section):
    path: str | None = "/health"
    metrics_path: str | None = "/metrics"
    interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    eject_after_failures: int = Field(3, ge=1)
    readmit_after_s: float = Field(10.0, ge=0)

    @field_validator("path", "metrics_path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        return value


class AffinityConfig(_Section):
    prefix_chars: int = Field(1024, ge=0)
    max_imbalance: int = Field(4, ge=0)


class PoolConfig(_Section):
    tier: Literal["self_hosted", "external"]
    model: str = Field(min_length=1)
    upstreams: list[UpstreamConfig] = Field(min_length=1)
    cost: CostConfig = CostConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    max_tokens: int = Field(4096, ge=1)
    sla_wait_s: float | None = Field(None, gt=0)
    queue: QueueConfig = QueueConfig()
    health: HealthConfig = HealthConfig()
    affinity: AffinityConfig = AffinityConfig()
    max_attempts: int = Field(3, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _tier_defaults(cls, data):
        # An external API has no /health or tokenmill /metrics: passive ejection only.
        if isinstance(data, dict) and data.get("tier") == "external":
            health = dict(data.get("health") or {})
            health.setdefault("path", None)
            health.setdefault("metrics_path", None)
            data = {**data, "health": health}
        return data


class ModelConfig(_Section):
    pool: str
    overflow: str | None = None


class AutoWeights(_Section):
    prompt_per_1k_tokens: float = 0.5
    max_tokens_per_1k: float = 0.5
    code: float = 0.6
    reasoning_per_marker: float = 0.4
    max_reasoning_markers: int = Field(2, ge=0)


_CODE_MARKERS = ["```", "def ", "class ", "function ", "#include", "import ", "SELECT ", "=>", "};", "stack trace",
                 "Traceback", "compile", "regex"]
_REASONING_MARKERS = ["step by step", "step-by-step", "prove", "derive", "explain why", "reason about",
                      "trade-off", "tradeoff", "analyze", "analyse", "compare", "plan ", "first,", "then,",
                      "finally,", "multi-step", "calculate", "optimal"]


class AutoConfig(_Section):
    """The `auto` model alias: a score chooses between two aliases (docs/gateway.md, Routing)."""
    small: str
    frontier: str
    threshold: float = 1.0
    weights: AutoWeights = AutoWeights()
    code_markers: list[str] = Field(default_factory=lambda: list(_CODE_MARKERS))
    reasoning_markers: list[str] = Field(default_factory=lambda: list(_REASONING_MARKERS))
    header: str = "x-tokenmill-route"


class LedgerConfig(_Section):
    flush_interval_s: float = Field(1.0, gt=0)


class GatewayConfig(_Section):
    listen: ListenConfig = ListenConfig()
    database_url: str = Field(default_factory=default_database_url)
    redis_url: str | None = None
    redis_key_prefix: str = Field("tokenmill:gw:", min_length=1)
    admin_key_env: str | None = "TOKENMILL_ADMIN_KEY"
    limiter_window_s: float = Field(60.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    pools: dict[str, PoolConfig] = Field(min_length=1)
    models: dict[str, ModelConfig] = Field(min_length=1)
    auto: AutoConfig | None = None

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        for alias, model in self.models.items():
            if alias == AUTO_MODEL:
                raise ValueError(f"models.{alias}: '{AUTO_MODEL}' is reserved; configure it under 'auto:'")
            for field in ("pool", "overflow"):
                pool = getattr(model, field)
                if pool is not None and pool not in self.pools:
                    raise ValueError(f"models.{alias}.{field}: no pool named {pool!r} "
                                     f"(pools: {', '.join(sorted(self.pools))})")
            if model.overflow is not None and model.overflow == model.pool:
                raise ValueError(f"models.{alias}.overflow: must be another pool than {model.pool!r}")
        if self.auto is not None:
            for field in ("small", "frontier"):
                alias = getattr(self.auto, field)
                if alias not in self.models:
                    raise ValueError(f"auto.{field}: no model alias named {alias!r} "
                                     f"(models: {', '.join(sorted(self.models))})")
        return self

    @property
    def aliases(self) -> list[str]:
        """Model names clients may ask for."""
        return list(self.models) + ([AUTO_MODEL] if self.auto is not None else [])

    def upstream_api_keys(self) -> dict[tuple[str, int], str | None]:
        """(pool, upstream index) -> the key read from its `api_key_env` (ConfigError if unset)."""
        keys = {}
        for pool_name, pool in self.pools.items():
            for index, upstream in enumerate(pool.upstreams):
                if upstream.api_key_env is None:
                    keys[(pool_name, index)] = None
                    continue
                value = os.environ.get(upstream.api_key_env, "")
                if not value:
                    raise ConfigError(f"pools.{pool_name}.upstreams.{index}.api_key_env: the environment "
                                      f"variable {upstream.api_key_env} is not set")
                keys[(pool_name, index)] = value
        return keys

    def admin_key(self) -> str | None:
        """The admin key from `admin_key_env`, or None (the admin API is then off)."""
        if self.admin_key_env is None:
            return None
        return os.environ.get(self.admin_key_env) or None


def _describe(error: ValidationError) -> str:
    problems = []
    for problem in error.errors()[:5]:
        location = ".".join(str(part) for part in problem.get("loc", ()))
        message = problem.get("msg", "invalid").removeprefix("Value error, ")
        problems.append(f"{location}: {message}" if location else message)
    return "; ".join(problems)


def parse_config(data: object, source: str = "config") -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None
    try:
        config.upstream_api_keys()
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return config


def load_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read the config file {path}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    return parse_config(data, str(path))
