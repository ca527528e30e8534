"""On-disk cache of GGUF conversions.

A conversion dequantizes every tensor to float32 and writes ``config.json``,
``model.safetensors`` (in the model's own parameter names) and the tokenizer to
a directory keyed by the GGUF file's path, size and mtime. The directory
appears atomically (built under a temporary name, then renamed), so an
interrupted conversion leaves no partial cache behind; later loads read it like
any Hugging Face directory.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from gguf import GGUFReader
from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tokenmill.models.gguf_loader import gguf_config, gguf_tensors
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
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache may be shared
    try:
        convert_gguf(gguf_path, tmp)
        # Flush file contents before the rename publishes them, so that even a
        # power loss cannot leave a complete-looking entry with truncated files.
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
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
