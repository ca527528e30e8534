"""Paged attention over a block-structured KV cache.

Each layer owns a ``(key_cache, value_cache)`` pair, each of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``. The K/V of a token at
absolute position ``p`` of a sequence lives at flat slot
``block_table[p // block_size] * block_size + p % block_size``.

One engine step may mix decodes (one new token, long context) with prefill
chunks (many new tokens, possibly with earlier chunks already cached). All
single-token sequences are served together: on CPU by one fused kernel that
reads each sequence's blocks in place (tokenmill/kernels), elsewhere by one
batched SDPA call over their gathered keys; every multi-token sequence gets its
own SDPA call.

Only slots holding this sequence's own K/V (written this step or earlier) are
ever read, and padding repeats such a slot under a mask, so whatever the rest of
the cache holds (uninitialized memory, NaNs, other sequences) cannot leak in.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokenmill.kernels import cpu_kernels_for


@dataclass
class PrefillPlan:
    """How one multi-token sequence attends, for one sliding-window setting."""

    token_start: int  # first row of this sequence in the flattened batch
    token_end: int
    # Cache slots of the visible keys, or None when the sequence has no cached
    # context yet and its keys are exactly the new k/v of this step.
    slots: torch.Tensor | None  # [num_keys]
    mask: torch.Tensor | None  # [query_len, num_keys] bool, True = attend
    is_causal: bool  # plain causal over fresh k/v: lets SDPA skip the mask


@dataclass
class WindowPlan:
    """Gather indices and masks for one sliding-window size (None = full)."""

    decode_slots: torch.Tensor | None  # [num_decodes * max_keys] cache slots to gather
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_keys] bool, None if no padding
    prefills: list[PrefillPlan]
    # Gather destinations reused by every layer of the step, keyed by cache
    # dtype/shape: allocating fresh multi-MB tensors per layer costs more
    # (page faults) than the gather itself.
    buffers: dict = field(default_factory=dict)


@dataclass
class AttentionMetadata:
    """Built once per engine step by the runner, shared (read-only) by all layers.

    Tokens are flattened sequence by sequence. Tensors live on the model device;
    the ``*_cpu`` fields mirror them for Python-side planning without syncs.
    Layers only read it, except that the first layer using a given sliding
    window memoizes that window's gather plan (see :meth:`window_plan`).
    """

    positions: torch.Tensor  # [num_tokens] int64 absolute position of each new token
    slot_mapping: torch.Tensor  # [num_tokens] int64 flat cache slot of each new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int64 row offsets into the batch
    context_lens: torch.Tensor  # [num_seqs] int64 cached + new tokens
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int64, padded with 0
    block_size: int
    query_lens_cpu: list[int]
    num_computed_cpu: list[int]
    query_start_cpu: list[int]
    decode_seq_ids: torch.Tensor  # [num_decodes] sequences with query_len == 1
    decode_token_ids: torch.Tensor  # [num_decodes] their rows in the batch
    decode_block_tables: torch.Tensor  # [num_decodes, max_num_blocks] int64, their block tables
    decode_context_lens: torch.Tensor  # [num_decodes] int64, their context lengths (the query included)
    num_decodes: int
    all_decode: bool  # every row is a decode, in sequence order
    # Host copies for planning, so building a plan never syncs with the device.
    block_tables_cpu: torch.Tensor = field(repr=False)
    decode_seq_ids_cpu: torch.Tensor = field(repr=False)
    _plans: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.query_start_cpu[-1]

    def window_plan(self, sliding_window: int | None, decodes: bool = True) -> WindowPlan:
        """Gather indices and masks for ``sliding_window``, computed on first use;
        without the decode gather when `decodes` is false (the fused kernel needs none)."""
        key = (sliding_window, decodes)
        plan = self._plans.get(key)
        if plan is None:
            plan = _build_window_plan(self, sliding_window, decodes)
            self._plans[key] = plan
        return plan


def build_attention_metadata(
    query_lens: list[int],
    num_computed_tokens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device,
) -> AttentionMetadata:
    """Describe one engine step for the attention layers.

    Sequence ``i`` contributes ``query_lens[i] >= 1`` new tokens at positions
    ``num_computed_tokens[i] ..`` and ``block_tables[i]`` must already cover all
    of its positions after this step.
    """
    num_seqs = len(query_lens)
    if not (num_seqs == len(num_computed_tokens) == len(block_tables)) or num_seqs == 0:
        raise ValueError("query_lens, num_computed_tokens and block_tables must be non-empty and equally long")
    for i, (q_len, computed, table) in enumerate(zip(query_lens, num_computed_tokens, block_tables)):
        if q_len < 1:
            raise ValueError(f"sequence {i} has query_len {q_len}; every sequence needs at least one new token")
        if computed + q_len > len(table) * block_size:
            raise ValueError(
                f"sequence {i} needs {computed + q_len} slots but its block table covers {len(table) * block_size}"
            )

    q_lens = torch.tensor(query_lens, dtype=torch.int64)
    computed = torch.tensor(num_computed_tokens, dtype=torch.int64)
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int64)
    query_start = torch.zeros(num_seqs + 1, dtype=torch.int64)
    torch.cumsum(q_lens, 0, out=query_start[1:])

    num_tokens = int(query_start[-1])
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # [num_tokens]
    positions = torch.arange(num_tokens) - query_start[seq_of_token] + computed[seq_of_token]
    slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size

    decode_seq_ids = torch.nonzero(q_lens == 1).flatten()
    num_decodes = decode_seq_ids.numel()
    context_lens = computed + q_lens
    all_decode = num_decodes == num_seqs
    return AttentionMetadata(
        positions=positions.to(device),
        slot_mapping=slots.to(device),
        query_start_loc=query_start.to(device),
        context_lens=context_lens.to(device),
        block_tables=tables.to(device),
        block_size=block_size,
        query_lens_cpu=list(query_lens),
        num_computed_cpu=list(num_computed_tokens),
        query_start_cpu=query_start.tolist(),
        decode_seq_ids=decode_seq_ids.to(device),
        decode_token_ids=query_start[decode_seq_ids].to(device),
        decode_block_tables=(tables if all_decode else tables[decode_seq_ids]).to(device),
        decode_context_lens=(context_lens if all_decode else context_lens[decode_seq_ids]).to(device),
        num_decodes=num_decodes,
        all_decode=all_decode,
        block_tables_cpu=tables,
        decode_seq_ids_cpu=decode_seq_ids,
    )


def _slots(tables: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slots of ``positions`` (any shape, leading dim per ``seq_ids``)."""
    blocks = tables[seq_ids.view(-1, *([1] * (positions.dim() - 1))), positions // block_size]
    return blocks * block_size + positions % block_size


def _build_window_plan(md: AttentionMetadata, window: int | None, decodes: bool) -> WindowPlan:
    device = md.positions.device
    tables = md.block_tables_cpu

    decode_slots = decode_mask = None
    if md.num_decodes and decodes:
        seq_ids = md.decode_seq_ids_cpu
        ctx = torch.tensor(md.num_computed_cpu, dtype=torch.int64)[seq_ids] + 1  # [num_decodes]
        # The single query sits at ctx - 1, so the visible keys are [lo, ctx).
        lo = (ctx - window).clamp(min=0) if window is not None else torch.zeros_like(ctx)
        num_keys = ctx - lo
        max_keys = int(num_keys.max())
        offsets = torch.arange(max_keys)
        key_pos = torch.minimum(lo[:, None] + offsets, ctx[:, None] - 1)  # [num_decodes, max_keys]
        decode_slots = _slots(tables, seq_ids, key_pos, md.block_size).flatten().to(device)
        if bool((num_keys != max_keys).any()):
            decode_mask = (offsets < num_keys[:, None])[:, None, None, :].to(device)

    prefills = []
    for i, q_len in enumerate(md.query_lens_cpu):
        if q_len == 1:
            continue
        computed = md.num_computed_cpu[i]
        start = md.query_start_cpu[i]
        if computed == 0 and window is None:
            prefills.append(PrefillPlan(start, start + q_len, None, None, True))
            continue
        # Keys before lo are outside the window of every query of this chunk.
        lo = max(0, computed - window + 1) if window is not None else 0
        key_pos = torch.arange(lo, computed + q_len)
        slots = None if computed == 0 else _slots(tables, torch.tensor([i]), key_pos, md.block_size).to(device)
        query_pos = torch.arange(computed, computed + q_len)[:, None]  # [q_len, 1]
        mask = key_pos[None, :] <= query_pos  # [q_len, num_keys]
        if window is not None:
            mask &= key_pos[None, :] > query_pos - window
        prefills.append(PrefillPlan(start, start + q_len, slots, mask.to(device), False))
    return WindowPlan(decode_slots, decode_mask, prefills)


def _gather(plan: WindowPlan, cache: torch.Tensor, which: str) -> torch.Tensor:
    """Gather the decode keys or values into a buffer shared by the step's layers."""
    flat = cache.view(-1, *cache.shape[2:])  # [num_slots, kv_heads, head_dim]
    shape = (plan.decode_slots.numel(), *flat.shape[1:])
    key = (which, cache.dtype, shape)
    buf = plan.buffers.get(key)
    if buf is None:
        buf = plan.buffers[key] = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    return torch.index_select(flat, 0, plan.decode_slots, out=buf)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    attn_metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Store this step's k/v in the cache, then attend causally over each sequence.

    Args:
        q: ``[num_tokens, num_heads, head_dim]`` rotated queries.
        k, v: ``[num_tokens, num_kv_heads, head_dim]`` rotated keys and values.
        kv_cache: this layer's ``(key_cache, value_cache)``, each contiguous
            ``[num_blocks, block_size, num_kv_heads, head_dim]``; updated in place.
        scale: softmax scale applied to ``q @ k^T``.
        sliding_window: key ``j`` is visible to query ``i`` iff
            ``i - sliding_window < j <= i``; None means plain causal.

    Returns:
        ``[num_tokens, num_heads, head_dim]`` in ``q.dtype``.
    """
    key_cache, value_cache = kv_cache
    num_kv_heads, head_dim = key_cache.shape[2:]
    num_tokens, num_heads, _ = q.shape
    group = num_heads // num_kv_heads
    md = attn_metadata

    flat_k = key_cache.view(-1, num_kv_heads, head_dim)  # [num_slots, kv_heads, head_dim]
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)
    kernels = cpu_kernels_for(q)
    if (kernels and k.dtype == key_cache.dtype and v.dtype == value_cache.dtype and k.stride(-1) == 1
            and v.stride(-1) == 1):
        torch.ops.tokenmill.store_kv(k, v, key_cache, value_cache, md.slot_mapping)
    else:
        flat_k.index_copy_(0, md.slot_mapping, k.to(key_cache.dtype))
        flat_v.index_copy_(0, md.slot_mapping, v.to(value_cache.dtype))

    fused_decode = md.num_decodes > 0 and kernels and key_cache.dtype == q.dtype
    plan = md.window_plan(sliding_window, decodes=not fused_decode)
    out = None if md.all_decode else q.new_empty(num_tokens, num_heads, head_dim)

    if fused_decode:
        dq = q if md.all_decode else q.index_select(0, md.decode_token_ids)
        o = torch.ops.tokenmill.paged_decode_attention(
            dq.contiguous(), key_cache, value_cache, md.decode_block_tables, md.decode_context_lens, scale,
            sliding_window or 0)  # [num_decodes, num_heads, head_dim]
        if md.all_decode:
            return o
        out.index_copy_(0, md.decode_token_ids, o)
    elif md.num_decodes:
        n = md.num_decodes
        # [n, kv_heads, max_keys, head_dim]: a strided view, SDPA reads it in place.
        keys = _gather(plan, key_cache, "k").view(n, -1, num_kv_heads, head_dim).transpose(1, 2).to(q.dtype)
        values = _gather(plan, value_cache, "v").view(n, -1, num_kv_heads, head_dim).transpose(1, 2).to(q.dtype)
        # A decode has one query per head, so the query heads sharing a KV head
        # can stand in for the query-length axis: GQA without repeating K/V.
        dq = q if md.all_decode else q.index_select(0, md.decode_token_ids)
        dq = dq.reshape(n, num_kv_heads, group, head_dim)
        o = F.scaled_dot_product_attention(dq, keys, values, attn_mask=plan.decode_mask, scale=scale)
        o = o.reshape(n, num_heads, head_dim)
        if md.all_decode:
            return o
        out.index_copy_(0, md.decode_token_ids, o)

    for p in plan.prefills:
        q_len = p.token_end - p.token_start
        # [kv_heads, group, q_len, head_dim]: the query heads of a KV head as the head axis,
        # the KV heads as the batch axis, so the keys and values are only broadcast
        # (stride 0) to the group; with `enable_gqa` CPU SDPA takes a slower path.
        pq = q[p.token_start : p.token_end].transpose(0, 1).reshape(num_kv_heads, group, q_len, head_dim)
        if p.slots is None:
            pk = k[p.token_start : p.token_end]  # [q_len, kv_heads, head_dim]
            pv = v[p.token_start : p.token_end]
        else:
            pk = flat_k.index_select(0, p.slots).to(q.dtype)  # [num_keys, kv_heads, head_dim]
            pv = flat_v.index_select(0, p.slots).to(q.dtype)
        num_keys = pk.shape[0]
        o = F.scaled_dot_product_attention(
            pq,
            pk.transpose(0, 1)[:, None].expand(num_kv_heads, group, num_keys, head_dim),
            pv.transpose(0, 1)[:, None].expand(num_kv_heads, group, num_keys, head_dim),
            attn_mask=p.mask,
            is_causal=p.is_causal,
            scale=scale,
        )  # [kv_heads, group, q_len, head_dim]
        out[p.token_start : p.token_end] = o.reshape(num_heads, q_len, head_dim).transpose(0, 1)
    return out
