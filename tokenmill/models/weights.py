"""Fill a model built on the meta device from checkpoint tensors.

Checkpoint names follow Hugging Face (``...self_attn.q_proj.weight``); models fuse
some projections, declared by a ``packed_modules_mapping`` class attribute
``{checkpoint_module: (model_module, shard_name)}``. Tensors already in the
model's own names (as written by the GGUF cache) pass through unchanged.
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tokenmill.models.layers.linear import PackedLinear


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint shards of a Hugging Face directory, index first if present."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob("*.safetensors"))


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_checkpoint_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device | str,
) -> None:
    """Materialize every parameter of ``model`` from ``weights`` in ``dtype`` on ``device``.

    ``model.remap_checkpoint_name(name)`` may rename a checkpoint tensor or return
    None to skip it. Raises ValueError on unknown tensors, shape mismatches and
    parameters (or packed shards) that the checkpoint does not provide.
    """
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())
    filled: dict[str, torch.Tensor] = {}
    rows_filled: dict[str, int] = {}

    for ckpt_name, tensor in weights:
        name = model.remap_checkpoint_name(ckpt_name)
        if name is None:
            continue
        shard = None
        for src, (dst, shard_name) in packed.items():
            if f".{src}." in name:
                name, shard = name.replace(f".{src}.", f".{dst}."), shard_name
                break
        if name not in params:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} does not match any parameter of {type(model).__name__}")
        shape = params[name].shape

        if shard is None:
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{ckpt_name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(shape)}")
            # Reuse the checkpoint's memory when no cast or move is needed.
            filled[name] = tensor.to(device=device, dtype=dtype)
            rows_filled[name] = shape[0]
            continue

        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert isinstance(module, PackedLinear)
        start, size = module.shard_ranges[shard]
        if tensor.shape[0] != size or tuple(tensor.shape[1:]) != tuple(shape[1:]):
            raise ValueError(
                f"{ckpt_name}: checkpoint shape {tuple(tensor.shape)} does not fit shard {shard} of {name}"
            )
        if name not in filled:
            filled[name] = torch.empty(shape, dtype=dtype, device=device)
            rows_filled[name] = 0
        filled[name][start : start + size].copy_(tensor)
        rows_filled[name] += size

    missing = [n for n, p in params.items() if rows_filled.get(n, 0) != p.shape[0]]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} parameter(s) of {type(model).__name__}: {shown}")

    for name, tensor in filled.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
