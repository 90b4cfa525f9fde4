"""Post-training pruning on a CUDA model: weights, statistics and solves stay on the device.

Skipped without a CUDA device (CI has none).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import nmopt
from nmopt.posttrain import PruneConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def tiny_llama(dtype):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "admm", "adaprune"])
def test_cuda_model_is_pruned_on_the_device(method, dtype):
    model = tiny_llama(dtype)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))  # a CPU tensor: moved
    rep = nmopt.prune_model(model, ids, PruneConfig(method=method, adaprune_steps=20), progress=False)
    assert rep.layers_pruned == 14 and rep.max_gap <= nmopt.OPTIMALITY_TOL
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            assert mod.weight.is_cuda and mod.weight.dtype == dtype
            nmopt.check_mask(mod.weight != 0, "4:8", True)
    assert all(r.error_after <= r.error_before * (1 + 1e-6) + 1e-12 for r in rep.layers)
    with torch.no_grad():
        assert torch.isfinite(model(ids.cuda()).logits.float()).all()
