"""What every causal LM here shares above its decoder stack."""

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.models.layers.attention import AttentionMetadata


class PagedCausalLM(nn.Module):
    """A decoder stack (`self.model`) plus the output layer, over a paged KV cache.

    Checkpoints' separate q/k/v and gate/up projections load into fused
    `qkv_proj` / `gate_up_proj` (see `packed_modules_mapping`). The output layer
    is the embedding matrix when `tied`, else its own `lm_head`.
    """

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config, model: nn.Module, tied: bool, final_logit_softcapping: float | None = None):
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.final_logit_softcapping = final_logit_softcapping
        # A module computing ``hidden @ output_weight().T`` faster (set from outside,
        # see tokenmill/models/prepack.py); None: a plain F.linear.
        self.output_head: nn.Module | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """``input_ids``/``positions`` ``[num_tokens]`` -> hidden states ``[num_tokens, hidden]``."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def output_weight(self) -> torch.Tensor:
        """The output layer's ``[vocab, hidden]`` weight (the embedding when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` -> logits ``[n, vocab]`` in the compute dtype, as the
        reference computes them (callers upcast to float32 where they need to;
        a greedy pick does not). Softcapping, when configured, is applied in float32."""
        if self.output_head is not None:
            logits = self.output_head(hidden_states)
        else:
            logits = F.linear(hidden_states, self.output_weight())
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits.float() / cap) * cap
        return logits
