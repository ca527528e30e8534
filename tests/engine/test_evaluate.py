"""Perplexity through the engine's forward path equals the reference model's."""
import math

import pytest
import torch

from tokenmill.engine.evaluate import agreement_length, perplexity
from tokenmill.models.loader import load_model
from tests.models.tiny_models import VOCAB, tiny_model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_perplexity_matches_transformers(arch, tmp_path):
    reference = tiny_model(arch)
    reference.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    info = loaded.info
    ids = torch.randint(1, VOCAB, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    # Two windows of 40 and 30 tokens, each after token 0 as BOS, fed 16 tokens per forward.
    result = perplexity(loaded.model, info.num_layers, info.num_kv_heads, info.head_dim, ids,
                        window=40, chunk=16, block_size=4, bos_token_id=0)
    expected_nll, count = 0.0, 0
    with torch.no_grad():
        for start in (0, 40):
            window = [0] + ids[start:start + 40]
            logits = reference(torch.tensor([window])).logits[0, :-1].float()
            expected_nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum"))
            count += len(window) - 1
    assert result.num_tokens == count == 70
    assert math.isclose(result.mean_nll, expected_nll / count, rel_tol=1e-4)
    assert math.isclose(result.perplexity, math.exp(expected_nll / count), rel_tol=1e-4)
    with pytest.raises(ValueError, match="two tokens"):
        perplexity(loaded.model, info.num_layers, info.num_kv_heads, info.head_dim, [5])


def test_agreement_length():
    assert agreement_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert agreement_length([1, 2], [1, 2, 3]) == 2
    assert agreement_length([], [1]) == 0
