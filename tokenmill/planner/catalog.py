"""The planner's catalogs: devices (GPUs and CPU profiles) with prices, models,
precisions and API price lists, loaded from versioned YAML files.

The built-in files live in `tokenmill/planner/catalogs/`. A user file (`--catalog`,
`--device-profile`) has the same layout, any subset of the sections `devices`,
`models`, `precisions`, `apis`; its entries replace built-in entries of the same
name and add the others. Every entry carries `source` and `date` so each number
printed can be traced. Units: memory in GB (10^9 bytes), bandwidth in GB/s,
compute in dense TFLOP/s (no sparsity), money in USD.

Lookups accept an entry's name or any of its aliases, case-insensitively, and
raise `PlanError` naming the valid choices otherwise.
"""
from __future__ import annotations

import datetime as _dt
import importlib.resources
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tokenmill.planner.efficiency import Efficiency, efficiency_from_mapping
from tokenmill.planner.errors import PlanError, unknown_name

CATALOG_VERSION = 1
BUILTIN_FILES = ("devices.yaml", "models.yaml", "precisions.yaml", "apis.yaml")
PRICE_POINTS = ("low", "mid", "high")
COMPUTE_TYPES = ("fp32", "bf16", "fp8", "int8")
CHEAPEST = "cheapest"  # provider choice: the lowest listed price of each device


@dataclass(frozen=True)
class DevicePrice:
    """What one provider charges for one device: per hour or per month, a point or a range."""

    provider: str
    low: float
    high: float
    per: str  # "hour" or "month"
    source: str
    date: str

    def at(self, point: str) -> float:
        """The price at `point` (low, mid or high) in USD per `per`."""
        return {"low": self.low, "mid": (self.low + self.high) / 2, "high": self.high}[point]

    def usd_per_month(self, hours_per_month: float, point: str) -> float:
        """One device for a month: hourly prices times the hours, monthly prices as they are."""
        return self.at(point) * hours_per_month if self.per == "hour" else self.at(point)

    def usd_per_hour(self, hours_per_month: float, point: str) -> float:
        return self.at(point) if self.per == "hour" else self.at(point) / hours_per_month

    def describe(self) -> str:
        def figure(value: float) -> str:
            return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"

        amount = f"${figure(self.low)}" if self.low == self.high else f"${figure(self.low)}-{figure(self.high)}"
        return f"{amount}/{'h' if self.per == 'hour' else 'month'} ({self.provider})"


@dataclass(frozen=True)
class ServerlessPrice:
    """A per-second, pay-while-busy price for one worker of this device."""

    provider: str
    usd_per_second: float
    source: str
    date: str


@dataclass(frozen=True)
class Device:
    """A GPU (or a CPU profile) as the roofline model sees it."""

    name: str
    label: str
    kind: str  # "gpu" or "cpu"
    memory_gb: float
    memory_bandwidth_gb_per_s: float
    dense_tflops: Mapping[str, float]  # compute type -> dense TFLOP/s (TOP/s for int8)
    ecc: bool
    mig: bool
    source: str
    date: str
    aliases: tuple[str, ...] = ()
    prices: tuple[DevicePrice, ...] = ()
    serverless_prices: tuple[ServerlessPrice, ...] = ()
    efficiency: Efficiency | None = None  # measured or calibrated factors, when known

    def tflops(self, compute: str) -> float | None:
        return self.dense_tflops.get(compute)

    def price(self, provider: str | None, point: str, hours_per_month: float) -> DevicePrice | None:
        """The named provider's price; None: the first listed (the catalog's default);
        'cheapest': the lowest at `point`. Returns None when the device has no price."""
        if not self.prices:
            if provider is not None and provider != CHEAPEST:
                raise PlanError(f"{self.name} has no prices; give --usd-per-hour")
            return None
        if provider is None:
            return self.prices[0]
        if provider == CHEAPEST:
            return min(self.prices, key=lambda p: p.usd_per_month(hours_per_month, point))
        for price in self.prices:
            if price.provider.lower() == provider.lower():
                return price
        raise unknown_name(f"provider for {self.name}", provider, [CHEAPEST] + [p.provider for p in self.prices])


@dataclass(frozen=True)
class ModelSpec:
    """A dense decoder-only transformer: what weight, KV and FLOP counts need.

    `parameters` counts every stored parameter once (tied embeddings once).
    GGUF files also give `file_weight_bytes` (the stored tensors, exact) and
    `file_embedding_bytes` (the token embedding table as stored).
    """

    name: str
    label: str
    parameters: int
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_context: int
    source: str
    date: str
    intermediate_size: int | None = None
    aliases: tuple[str, ...] = ()
    file_weight_bytes: int | None = None
    file_embedding_bytes: int | None = None
    file_quantization: str | None = None

    @property
    def embedding_parameters(self) -> int:
        """One vocab x hidden matrix (the input embedding; the LM head has the same shape)."""
        return self.vocab_size * self.hidden_size

    @property
    def head_parameters(self) -> int:
        """Parameters stored for the embedding and the LM head: one matrix if tied, two if not."""
        return self.embedding_parameters * (1 if self.tie_word_embeddings else 2)

    @property
    def matmul_parameters(self) -> int:
        """Parameters multiplied per token: all but the untied input embedding, which is a lookup."""
        return self.parameters - (0 if self.tie_word_embeddings else self.embedding_parameters)


@dataclass(frozen=True)
class Precision:
    """How weights are stored and multiplied.

    Effective bits per quantized weight = weight_bits + group_overhead_bits / group_size
    (scales and zero points shared by a group). `embedding_bits` is the width the
    format keeps the embedding and LM head at (None: quantized like the rest).
    `compute` is the tensor-core type the matmuls run in; devices without it fall
    back to bf16 (weight-only kernels). `from_file` marks the GGUF file's own
    tensors, whose bytes are read from the file.
    """

    name: str
    label: str
    weight_bits: float
    compute: str
    kv_bytes: int
    source: str
    date: str
    group_size: int | None = None
    group_overhead_bits: float = 0.0
    embedding_bits: float | None = None
    in_comparison: bool = True
    from_file: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def effective_bits(self) -> float:
        if self.group_size:
            return self.weight_bits + self.group_overhead_bits / self.group_size
        return self.weight_bits


@dataclass(frozen=True)
class ApiPrice:
    """A hosted API's list price per million input and output tokens."""

    name: str
    label: str
    usd_per_million_input: float
    usd_per_million_output: float
    source: str
    date: str
    aliases: tuple[str, ...] = ()

    def usd_per_request(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.usd_per_million_input + output_tokens * self.usd_per_million_output) / 1e6

    def blended_usd_per_token(self, input_tokens: float, output_tokens: float) -> float:
        """The mix's average price of one token (input and output counted alike)."""
        return self.usd_per_request(input_tokens, output_tokens) / (input_tokens + output_tokens)


def _lookup(entries: Iterable, kind: str, name: str):
    wanted = name.strip().lower()
    for entry in entries:
        if entry.name.lower() == wanted or wanted in (alias.lower() for alias in entry.aliases):
            return entry
    raise unknown_name(kind, name, [entry.name for entry in entries])


@dataclass(frozen=True)
class Catalog:
    devices: tuple[Device, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    precisions: tuple[Precision, ...] = ()
    apis: tuple[ApiPrice, ...] = ()
    files: tuple[str, ...] = field(default=(), compare=False)

    def device(self, name: str) -> Device:
        return _lookup(self.devices, "GPU", name)

    def model(self, name: str) -> ModelSpec:
        return _lookup(self.models, "model", name)

    def precision(self, name: str) -> Precision:
        return _lookup(self.precisions, "precision", name)

    def api(self, name: str) -> ApiPrice:
        return _lookup(self.apis, "API", name)

    def merged(self, other: Catalog) -> Catalog:
        """`other`'s entries replace same-named ones (aliases included) and add the rest."""
        def merge(mine: tuple, theirs: tuple) -> tuple:
            names = {entry.name.lower() for entry in theirs}
            names |= {alias.lower() for entry in theirs for alias in entry.aliases}
            kept = tuple(entry for entry in mine if entry.name.lower() not in names)
            return kept + tuple(theirs)

        return Catalog(merge(self.devices, other.devices), merge(self.models, other.models),
                       merge(self.precisions, other.precisions), merge(self.apis, other.apis),
                       self.files + other.files)


class _Entry:
    """Reads one YAML mapping with errors that say where: `devices.yaml: devices[2] (l40s): ...`."""

    def __init__(self, data, where: str):
        if not isinstance(data, dict):
            raise PlanError(f"{where}: expected a mapping, got {type(data).__name__}")
        self.data = data
        self.where = f"{where} ({data['name']})" if isinstance(data.get("name"), str) else where

    def get(self, key: str, default=...):
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise PlanError(f"{self.where}: missing {key!r}")
            return default
        return self.data[key]

    def number(self, key: str, default=..., positive: bool = True) -> float:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlanError(f"{self.where}: {key} must be a number, got {value!r}")
        if positive and value <= 0:
            raise PlanError(f"{self.where}: {key} must be positive, got {value!r}")
        return float(value)

    def integer(self, key: str, default=...) -> int:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PlanError(f"{self.where}: {key} must be a positive integer, got {value!r}")
        return value

    def text(self, key: str, default=...) -> str:
        value = self.get(key, default)
        if isinstance(value, _dt.date):  # YAML reads unquoted 2025-01-28 as a date
            return value.isoformat()
        if value is None:
            return None
        return str(value)

    def flag(self, key: str, default=...) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise PlanError(f"{self.where}: {key} must be true or false, got {value!r}")
        return value

    def aliases(self) -> tuple[str, ...]:
        value = self.get("aliases", [])
        if not isinstance(value, list):
            raise PlanError(f"{self.where}: aliases must be a list")
        return tuple(str(alias) for alias in value)

    def sourced(self) -> tuple[str, str]:
        return self.text("source"), self.text("date")


def _amount(entry: _Entry, key: str) -> tuple[float, float]:
    value = entry.get(key)
    if isinstance(value, list) and len(value) == 2:
        low, high = value
    else:
        low = high = value
    for number in (low, high):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number <= 0:
            raise PlanError(f"{entry.where}: {key} must be a positive number or [low, high], got {value!r}")
    if low > high:
        raise PlanError(f"{entry.where}: {key} range {value!r} has low > high")
    return float(low), float(high)


def _device_price(data, where: str) -> DevicePrice:
    entry = _Entry(data, where)
    if ("usd_per_hour" in entry.data) == ("usd_per_month" in entry.data):
        raise PlanError(f"{where}: give exactly one of usd_per_hour and usd_per_month")
    per = "hour" if "usd_per_hour" in entry.data else "month"
    low, high = _amount(entry, f"usd_per_{per}")
    return DevicePrice(entry.text("provider"), low, high, per, *entry.sourced())


def _device(data, where: str) -> Device:
    entry = _Entry(data, where)
    kind = entry.text("kind", "gpu")
    if kind not in ("gpu", "cpu"):
        raise PlanError(f"{entry.where}: kind must be gpu or cpu, got {kind!r}")
    memory_gb, bandwidth = entry.number("memory_gb"), entry.number("memory_bandwidth_gb_per_s")
    tflops = entry.get("dense_tflops")
    if not isinstance(tflops, dict) or not tflops:
        raise PlanError(f"{entry.where}: dense_tflops must map compute types to TFLOP/s")
    for key, value in tflops.items():
        if key not in COMPUTE_TYPES:
            raise PlanError(f"{entry.where}: unknown compute type {key!r} (choose from: {', '.join(COMPUTE_TYPES)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise PlanError(f"{entry.where}: dense_tflops.{key} must be a positive number, got {value!r}")
    prices = tuple(_device_price(item, f"{entry.where}.prices[{i}]")
                   for i, item in enumerate(entry.get("prices", [])))
    serverless = []
    for i, item in enumerate(entry.get("serverless_prices", [])):
        price = _Entry(item, f"{entry.where}.serverless_prices[{i}]")
        serverless.append(ServerlessPrice(price.text("provider"), price.number("usd_per_second"), *price.sourced()))
    efficiency = entry.get("efficiency", None)
    if efficiency is not None and not isinstance(efficiency, dict):
        raise PlanError(f"{entry.where}: efficiency must be a mapping")
    return Device(
        name=entry.text("name"), label=entry.text("label", entry.text("name")), kind=kind,
        memory_gb=memory_gb, memory_bandwidth_gb_per_s=bandwidth,
        dense_tflops={key: float(value) for key, value in tflops.items()},
        ecc=entry.flag("ecc", False), mig=entry.flag("mig", False), source=entry.text("source"),
        date=entry.text("date"), aliases=entry.aliases(), prices=prices, serverless_prices=tuple(serverless),
        efficiency=efficiency_from_mapping(efficiency) if efficiency else None)


def _model(data, where: str) -> ModelSpec:
    entry = _Entry(data, where)
    attention_heads = entry.integer("attention_heads")
    hidden_size = entry.integer("hidden_size")
    return ModelSpec(
        name=entry.text("name"), label=entry.text("label", entry.text("name")),
        parameters=entry.integer("parameters"), layers=entry.integer("layers"), hidden_size=hidden_size,
        attention_heads=attention_heads, kv_heads=entry.integer("kv_heads", attention_heads),
        head_dim=entry.integer("head_dim", hidden_size // attention_heads), vocab_size=entry.integer("vocab_size"),
        tie_word_embeddings=entry.flag("tie_word_embeddings"), max_context=entry.integer("max_context"),
        intermediate_size=entry.integer("intermediate_size", None), source=entry.text("source"),
        date=entry.text("date"), aliases=entry.aliases())


def _precision(data, where: str) -> Precision:
    entry = _Entry(data, where)
    compute = entry.text("compute")
    if compute not in COMPUTE_TYPES:
        raise PlanError(f"{entry.where}: compute must be one of {', '.join(COMPUTE_TYPES)}, got {compute!r}")
    return Precision(
        name=entry.text("name"), label=entry.text("label", entry.text("name")),
        weight_bits=entry.number("weight_bits"), compute=compute, kv_bytes=entry.integer("kv_bytes"),
        group_size=entry.integer("group_size", None),
        group_overhead_bits=entry.number("group_overhead_bits", 0.0, positive=False),
        embedding_bits=entry.number("embedding_bits", None), in_comparison=entry.flag("in_comparison", True),
        from_file=entry.flag("from_file", False), source=entry.text("source"), date=entry.text("date"),
        aliases=entry.aliases())


def _api(data, where: str) -> ApiPrice:
    entry = _Entry(data, where)
    return ApiPrice(name=entry.text("name"), label=entry.text("label", entry.text("name")),
                    usd_per_million_input=entry.number("usd_per_million_input"),
                    usd_per_million_output=entry.number("usd_per_million_output"), source=entry.text("source"),
                    date=entry.text("date"), aliases=entry.aliases())


_SECTIONS = {"devices": _device, "models": _model, "precisions": _precision, "apis": _api}


def catalog_from_document(document, origin: str) -> Catalog:
    """A parsed YAML/JSON document -> Catalog; `origin` names it in error messages."""
    if not isinstance(document, dict):
        raise PlanError(f"{origin}: expected a mapping with sections {', '.join(_SECTIONS)}")
    version = document.get("version", CATALOG_VERSION)
    if version != CATALOG_VERSION:
        raise PlanError(f"{origin}: catalog version {version!r} is not supported (expected {CATALOG_VERSION})")
    unknown = set(document) - set(_SECTIONS) - {"version", "updated", "notes"}
    if unknown:
        raise PlanError(f"{origin}: unknown section(s) {', '.join(sorted(unknown))} "
                        f"(choose from: {', '.join(_SECTIONS)})")
    sections = {}
    for section, parse in _SECTIONS.items():
        items = document.get(section) or []
        if not isinstance(items, list):
            raise PlanError(f"{origin}: {section} must be a list")
        sections[section] = tuple(parse(item, f"{origin}: {section}[{i}]") for i, item in enumerate(items))
        names = [entry.name.lower() for entry in sections[section]]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise PlanError(f"{origin}: {section} lists {', '.join(duplicates)} more than once")
    return Catalog(**sections, files=(origin,))


def load_catalog_file(path: str | Path) -> Catalog:
    """A user catalog or device profile (YAML or JSON, which YAML reads too)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PlanError(f"cannot read catalog {path}: {error.strerror or error}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PlanError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    return catalog_from_document(document, str(path))


def builtin_catalog() -> Catalog:
    """The catalogs shipped in the package."""
    catalog = Catalog()
    folder = importlib.resources.files("tokenmill.planner") / "catalogs"
    for name in BUILTIN_FILES:
        document = yaml.safe_load((folder / name).read_text(encoding="utf-8"))
        catalog = catalog.merged(catalog_from_document(document, name))
    return catalog


def load_catalog(extra_files: Iterable[str | Path] = (), include_cached_profiles: bool = True) -> Catalog:
    """Built-in catalogs, then measured device profiles from the cache, then `extra_files` in order."""
    from tokenmill.planner.measure import cached_profile_paths

    catalog = builtin_catalog()
    if include_cached_profiles:
        for path in cached_profile_paths():
            catalog = catalog.merged(load_catalog_file(path))
    for path in extra_files:
        catalog = catalog.merged(load_catalog_file(path))
    return catalog
