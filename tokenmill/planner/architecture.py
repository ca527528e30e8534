"""A model's architecture from a catalog name, a Hugging Face `config.json` or a
GGUF file, as a `ModelSpec`.

Parameter counts: from the checkpoint when it is there (safetensors headers,
GGUF tensor shapes), else from the Llama-style block formula
`parameter_count`, which reproduces the catalog's counts exactly. Only dense
decoder-only models are modelled: mixture-of-experts configs are refused.

Reading a GGUF with `gguf.GGUFReader` parses its whole vocabulary (seconds for a
262k-token tokenizer), so the result is cached per file (path, size, mtime)
under `$TOKENMILL_CACHE_DIR/planner/gguf` (default `~/.cache/tokenmill`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path

from tokenmill.planner.catalog import Catalog, ModelSpec
from tokenmill.planner.errors import PlanError

_CACHE_FORMAT = 1
# Gemma 2/3 put a norm before and after both attention and MLP; the rest one before each.
_FOUR_NORM_TYPES = ("gemma2", "gemma3", "gemma3_text")
_QK_NORM_TYPES = ("gemma3", "gemma3_text", "qwen3")
_QKV_BIAS_TYPES = ("qwen2",)
_TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3", "gemma3_text")


def planner_cache_dir() -> Path:
    """`$TOKENMILL_CACHE_DIR/planner`, else `~/.cache/tokenmill/planner` (the models' cache root)."""
    env = os.environ.get("TOKENMILL_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "tokenmill"
    return root / "planner"


def parameter_count(*, layers: int, hidden_size: int, attention_heads: int, kv_heads: int, head_dim: int,
                    intermediate_size: int, vocab_size: int, tie_word_embeddings: bool, norms_per_layer: int = 2,
                    qk_norm: bool = False, qkv_bias: bool = False, attention_output_bias: bool = False) -> int:
    """Parameters of a Llama-style decoder: embeddings (+ untied LM head), per layer q/k/v/o
    projections, a gated MLP (gate, up, down) and RMSNorm weights, then the final norm."""
    q_width, kv_width = attention_heads * head_dim, kv_heads * head_dim
    attention = hidden_size * q_width + 2 * hidden_size * kv_width + q_width * hidden_size
    if qkv_bias:
        attention += q_width + 2 * kv_width
    if attention_output_bias:
        attention += hidden_size
    if qk_norm:
        attention += 2 * head_dim
    mlp = 3 * hidden_size * intermediate_size
    per_layer = attention + mlp + norms_per_layer * hidden_size
    heads = vocab_size * hidden_size * (1 if tie_word_embeddings else 2)
    return heads + layers * per_layer + hidden_size


def _safetensors_parameter_count(folder: Path) -> int | None:
    """Sum of tensor sizes from the safetensors headers (no tensor data is read)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for size in info["shape"]:
                    count *= size
                total += count
    return total


def model_from_hf_config(path: str | Path) -> ModelSpec:
    """A Hugging Face model directory or its `config.json` -> ModelSpec."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PlanError(f"cannot read {config_path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise PlanError(f"{config_path}: not valid JSON ({error.msg})") from None
    outer_tied = config.get("tie_word_embeddings")
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers (Gemma 3) keep the decoder here
        config = {**config["text_config"], "model_type": config["text_config"].get("model_type", config.get("model_type"))}
    model_type = str(config.get("model_type", ""))
    if config.get("num_local_experts") or config.get("num_experts"):
        raise PlanError(f"{config_path}: mixture-of-experts models are not modelled (dense decoders only)")
    try:
        layers = int(config["num_hidden_layers"])
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise PlanError(f"{config_path}: missing or invalid {error} (need num_hidden_layers, hidden_size, "
                        f"num_attention_heads, vocab_size)") from None
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    tied = config.get("tie_word_embeddings", outer_tied)
    if tied is None:
        tied = model_type in _TIED_BY_DEFAULT
    context = int(config.get("max_position_embeddings") or 4096)
    counted = None if "quantization_config" in config else (
        _safetensors_parameter_count(config_path.parent))
    parameters = counted or parameter_count(
        layers=layers, hidden_size=hidden, attention_heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=intermediate, vocab_size=vocab, tie_word_embeddings=bool(tied),
        norms_per_layer=4 if model_type in _FOUR_NORM_TYPES else 2, qk_norm=model_type in _QK_NORM_TYPES,
        qkv_bias=model_type in _QKV_BIAS_TYPES or bool(config.get("attention_bias")),
        attention_output_bias=bool(config.get("attention_bias")))
    how = "safetensors headers" if counted else "architecture formula"
    return ModelSpec(name=config_path.parent.name or str(config_path), label=config_path.parent.name,
                     parameters=parameters, layers=layers, hidden_size=hidden, attention_heads=heads,
                     kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=bool(tied),
                     max_context=context, intermediate_size=intermediate,
                     source=f"{config_path} (parameters from {how})", date="")


def _gguf_cache_path(path: Path) -> Path:
    stat = path.stat()
    identity = f"{_CACHE_FORMAT}\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return planner_cache_dir() / "gguf" / (hashlib.sha256(identity.encode()).hexdigest()[:16] + ".json")


def _read_gguf(path: Path) -> ModelSpec:
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as error:
        raise PlanError(f"cannot read GGUF {path}: {error}") from None

    def field(key: str, default=None):
        item = reader.fields.get(key)
        return default if item is None else item.contents()

    arch = field("general.architecture")
    if arch is None:
        raise PlanError(f"{path}: no general.architecture in the GGUF metadata")
    if field(f"{arch}.expert_count"):
        raise PlanError(f"{path}: mixture-of-experts models are not modelled (dense decoders only)")

    def arch_int(key: str, default=None) -> int | None:
        value = field(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values (e.g. KV heads): the largest sizes the cache
            value = max(value)
        return None if value is None else int(value)

    layers, hidden = arch_int("block_count"), arch_int("embedding_length")
    heads = arch_int("attention.head_count")
    if layers is None or hidden is None or heads is None:
        raise PlanError(f"{path}: missing {arch}.block_count, embedding_length or attention.head_count")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise PlanError(f"{path}: no token_embd.weight tensor")
    file_type = field("general.file_type")
    try:
        quantization = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quantization = None
    return ModelSpec(
        name=path.stem, label=str(field("general.name", path.stem)),
        parameters=int(sum(int(t.n_elements) for t in reader.tensors)), layers=layers, hidden_size=hidden,
        attention_heads=heads, kv_heads=arch_int("attention.head_count_kv", heads),
        head_dim=arch_int("attention.key_length", hidden // heads), vocab_size=int(embedding.n_elements) // hidden,
        tie_word_embeddings="output.weight" not in tensors, max_context=arch_int("context_length", 4096),
        intermediate_size=arch_int("feed_forward_length"), source=f"{path} (GGUF metadata and tensor shapes)",
        date="", file_weight_bytes=int(sum(int(t.n_bytes) for t in reader.tensors)),
        file_embedding_bytes=int(embedding.n_bytes), file_quantization=quantization)


def model_from_gguf(path: str | Path, use_cache: bool = True) -> ModelSpec:
    """A GGUF file -> ModelSpec with the file's exact tensor bytes (cached per file)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"GGUF file not found: {path}")
    cache = _gguf_cache_path(path) if use_cache else None
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            data["aliases"] = tuple(data.get("aliases", ()))
            return ModelSpec(**data)
        except (OSError, ValueError, TypeError):
            pass  # an unreadable or outdated cache entry is rebuilt below
    spec = _read_gguf(path)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(dataclasses.asdict(spec)), encoding="utf-8")
            temporary.replace(cache)
        except OSError:
            pass  # a read-only cache only costs the next reader the parse
    return spec


def resolve_model(catalog: Catalog, text: str) -> ModelSpec:
    """A catalog name or alias, a Hugging Face directory / config.json, or a .gguf file."""
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf" or (path.is_file() and path.suffix.lower() != ".json"):
        return model_from_gguf(path)
    if path.is_dir() or (path.suffix.lower() == ".json" and path.is_file()):
        return model_from_hf_config(path)
    try:
        return catalog.model(text)
    except PlanError as error:
        raise PlanError(f"{error}; or give a Hugging Face model directory, a config.json or a .gguf file") from None
