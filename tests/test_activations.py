import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.activations import ActivationSource, CachedSource, ShuffleBuffer, write_cache


def _rows(n=24, L=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 200, (n, L), generator=g)


@pytest.mark.parametrize("policy", ["mask", "unmask", "all"])
def test_policies_pick_positions(llada, policy):
    src = ActivationSource(llada, ["blocks.1.hook_resid_post"], _rows(), policy=policy, seqs_per_batch=8)
    b = src.batch(0, 0)
    masked = b.info["masked"]
    assert {"mask": masked.all(), "unmask": (~masked).all(), "all": True}[policy]
    assert (b.info["position"][masked] > 0).all()  # the first token is never masked
    assert b.acts["blocks.1.hook_resid_post"].shape == (len(b), 64)
    assert torch.equal(src.batch(0, 0).info["token"], b.info["token"])  # deterministic


def test_shuffle_buffer_yields_each_token_once(llada):
    src = ActivationSource(llada, ["blocks.1.hook_resid_post"], _rows(), policy="all", seqs_per_batch=4)
    total = len(src) * 4 * 16
    buf = ShuffleBuffer(src, capacity=128, batch_size=32, seed=0)
    seen = torch.cat([buf.next().acts["blocks.1.hook_resid_post"] for _ in range(total // 32)])
    ref = torch.cat([src.batch(0, i).acts["blocks.1.hook_resid_post"] for i in range(len(src))])
    assert seen.shape == ref.shape
    torch.testing.assert_close(seen.sum(0), ref.sum(0), atol=1e-2, rtol=1e-4)
    assert torch.unique(seen, dim=0).shape[0] == torch.unique(ref, dim=0).shape[0]


def test_cache_roundtrip_and_corruption(llada, tmp_path):
    src = ActivationSource(llada, ["blocks.1.hook_resid_post"], _rows(), policy="mask", seqs_per_batch=8)
    write_cache(src, tmp_path / "c", progress=False)
    cached = CachedSource(tmp_path / "c")
    assert len(cached) == len(src)
    torch.testing.assert_close(cached.batch(0, 1).acts["blocks.1.hook_resid_post"], src.batch(0, 1).acts["blocks.1.hook_resid_post"])
    write_cache(src, tmp_path / "c", progress=False)  # resumable: complete shards are kept
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DLMScopeError, match="missing or corrupt"):
        CachedSource(tmp_path / "c")


def test_source_errors(llada, tiny_dirs):
    from dlmscope.models import load_model

    with pytest.raises(DLMScopeError, match="unknown position policy"):
        ActivationSource(llada, ["blocks.1.hook_resid_post"], _rows(), policy="odd")
    with pytest.raises(DLMScopeError, match="fewer than one batch"):
        ActivationSource(llada, ["blocks.1.hook_resid_post"], _rows(2), seqs_per_batch=8)
    with pytest.raises(DLMScopeError, match="unknown hook"):
        ActivationSource(llada, ["blocks.1.hook_attn"], _rows())
    causal = load_model(tiny_dirs["causal"])
    assert ActivationSource(causal, ["blocks.1.hook_resid_post"], _rows(), seqs_per_batch=8).policy == "clean"
