"""Convert llama.cpp GGUF files into a cached Hugging Face-style directory.

A conversion dequantizes every tensor to float32, undoes llama.cpp's storage
conventions, and writes ``config.json``, ``model.safetensors`` (in the model's
own parameter names) and the tokenizer to a cache directory keyed by the GGUF
file's path, size and mtime. The directory appears atomically (built under a
temporary name, then renamed), so an interrupted conversion leaves no partial
cache behind; later loads read it like any Hugging Face directory.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from tokenmill.models.layers.rotary import rope_inv_freq
from tokenmill.models.registry import resolve_architecture
from tokenmill.models.weights import load_checkpoint_weights

# Bump when the conversion output changes, so stale caches are not reused.
CACHE_FORMAT_VERSION = 1
SOURCE_FILE = "tokenmill_source.json"  # marks a directory as a GGUF conversion

# tokenizer_config.json entries forwarded when reopening a cached tokenizer.
_TOKENIZER_INIT_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "mask_token",
    "sep_token",
    "cls_token",
    "extra_special_tokens",
    "model_max_length",
    "padding_side",
    "truncation_side",
    "clean_up_tokenization_spaces",
    "chat_template",
)

_ARCHITECTURES = {
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma norms around both sublayers; llama.cpp's "ffn_norm" is the pre-MLP one.
_GEMMA3_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$TOKENMILL_CACHE_DIR``, else ``~/.cache/tokenmill``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TOKENMILL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokenmill"


def gguf_cache_dir(gguf_path: Path, root: Path) -> Path:
    """Where the conversion of ``gguf_path`` lives (whether or not it exists yet)."""
    stat = gguf_path.stat()
    identity = f"{CACHE_FORMAT_VERSION}\0{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return root / "gguf" / f"{gguf_path.stem}-{digest}"


def ensure_gguf_cache(gguf_path: Path, root: Path) -> Path:
    """Return the cached conversion of ``gguf_path``, converting it first if needed."""
    target = gguf_cache_dir(gguf_path, root)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a cache may be shared
    try:
        convert_gguf(gguf_path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp)  # a concurrent conversion won the race; its output is identical
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config, float32 weights and (when the file has one) tokenizer to ``out_dir``."""
    reader = GGUFReader(gguf_path)
    config = gguf_config(reader)
    _, model_cls = resolve_architecture(config)
    with torch.device("meta"):
        model = model_cls(config)
    load_checkpoint_weights(model, gguf_tensors(reader, config), torch.float32, "cpu")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    config.save_pretrained(out_dir)
    has_tokenizer = "tokenizer.ggml.tokens" in reader.fields
    if has_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(out_dir)
    stat = gguf_path.stat()
    source = {
        "format_version": CACHE_FORMAT_VERSION,
        "gguf_path": str(gguf_path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "has_tokenizer": has_tokenizer,
    }
    (out_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2))


def load_cached_tokenizer(cache_dir: Path) -> PreTrainedTokenizerFast | None:
    """Reopen the tokenizer saved by :func:`convert_gguf`, or None if the GGUF had none.

    Builds the fast tokenizer straight from ``tokenizer.json``: the generic
    ``AutoTokenizer`` route re-parses the (33 MB for Gemma) file in Python
    several times and takes seconds longer for the same tokenizer.
    """
    tokenizer_file = cache_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    saved = json.loads((cache_dir / "tokenizer_config.json").read_text())
    kwargs = {k: saved[k] for k in _TOKENIZER_INIT_KEYS if k in saved}
    template = cache_dir / "chat_template.jinja"
    if "chat_template" not in kwargs and template.is_file():
        kwargs["chat_template"] = template.read_text()
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **kwargs)


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: GGUFReader):
    """Build the Hugging Face config a GGUF file describes."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(_ARCHITECTURES))})")
    model_type, hf_arch = _ARCHITECTURES[arch]

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    kv_heads = meta("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise ValueError("GGUF files with a per-layer number of KV heads are not supported")
        kv_heads = kv_heads[0]
    head_dim = int(meta("attention.key_length") or meta("rope.dimension_count") or hidden // heads)
    num_layers = int(meta("block_count"))
    cfg = {
        "architectures": [hf_arch],
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    theta = float(meta("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0))
    rope = {"rope_type": "default", "rope_theta": theta}
    if meta("rope.scaling.type") == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(meta("rope.scaling.factor"))}

    if arch == "gemma3":
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer
        # 27B model whose query_pre_attn_scalar is hidden_size / num_heads.
        scalar = hidden // heads if num_layers == 62 else head_dim
        cfg.update(
            query_pre_attn_scalar=scalar,
            sliding_window=int(meta("attention.sliding_window", 4096)),
            # Every sixth layer is global: the pattern of all Gemma 3 checkpoints.
            layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)],
            rope_parameters={"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            hidden_activation="gelu_pytorch_tanh",
            final_logit_softcapping=meta("final_logit_softcapping"),
        )
    else:
        if "rope_freqs.weight" in tensors:
            factors = torch.from_numpy(_dequantize(tensors["rope_freqs.weight"]).copy()).flatten()
            rope = _llama3_rope_from_factors(factors, theta, head_dim)
        cfg["rope_parameters"] = rope
        if arch == "llama":
            cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
    return AutoConfig.for_model(model_type, **cfg)


def _llama3_rope_from_factors(factors: torch.Tensor, theta: float, head_dim: int) -> dict:
    """llama.cpp stores Llama 3 rope scaling as per-frequency divisors; recover the parameters.

    All Llama 3.x releases use low/high frequency factors 1 and 4 around an 8192
    original context; only the overall factor varies, and it is the largest divisor.
    """
    params = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base = rope_inv_freq(head_dim, {"rope_type": "default", "rope_theta": theta})
    if not torch.allclose(base / rope_inv_freq(head_dim, params), factors, rtol=1e-3):
        raise ValueError("the GGUF rope_freqs tensor does not match Llama 3 rope scaling; unsupported rope variant")
    return params


def _dequantize(tensor) -> np.ndarray:
    """Float32 array in PyTorch layout ``[rows, cols]`` (GGUF lists dims innermost first)."""
    array = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return array.reshape(shape)


def _unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for interleaved rotary.

    llama.cpp reorders each head's rows from [first half, second half] to
    pairs (i, i + head_dim/2) adjacent; rotate-half rope needs the original order.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(reader: GGUFReader, config):
    """Yield ``(hugging_face_name, float32 tensor)`` for every weight of the model."""
    arch = _field(reader, "general.architecture")
    layer_map = _GEMMA3_LAYER_TENSORS if arch == "gemma3" else _LAYER_TENSORS
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into the config's rope parameters
        base, _, suffix = t.name.rpartition(".")
        if base in _GLOBAL_TENSORS:
            name = f"{_GLOBAL_TENSORS[base]}.{suffix}"
        elif (m := _LAYER_NAME.fullmatch(t.name)) and m.group(2) in layer_map:
            name = f"model.layers.{m.group(1)}.{layer_map[m.group(2)]}.{m.group(3)}"
        else:
            raise ValueError(f"unexpected tensor {t.name!r} in {arch} GGUF file")
        array = _dequantize(t)
        if array.dtype != np.float32 or not array.flags.writeable:
            array = array.astype(np.float32)  # F32 tensors are read-only views of the mmapped file
        w = torch.from_numpy(array)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + weight) norm scale pre-added
        elif arch == "llama" and base.endswith(".attn_q"):
            w = _unpermute_rotary(w, config.num_attention_heads)
        elif arch == "llama" and base.endswith(".attn_k"):
            w = _unpermute_rotary(w, config.num_key_value_heads)
        yield name, w
