import json

import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.activations import (ActivationSource, CachedSource, Prefetcher, ShuffleBuffer, mmap_safetensors,
                                  trajectory_activations, write_cache)

HOOK = "blocks.1.hook_resid_post"


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n=24, L=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 200, (n, L), generator=g)


@pytest.mark.parametrize("policy", ["mask", "unmask", "all"])
def test_policies_pick_positions(llada, policy):
    src = ActivationSource(llada, ["blocks.0.hook_resid_post", HOOK], _rows(), policy=policy, seqs_per_batch=8)
    b = src.batch(0, 0)
    masked = b.info["masked"]
    assert {"mask": masked.all(), "unmask": (~masked).all(), "all": True}[policy]
    assert (b.info["position"][masked] > 0).all()  # the first token is never masked
    assert (b.info["position"] == 0).any() == (policy != "mask")
    assert b.acts[HOOK].shape == (len(b), 64) and b.acts["blocks.0.hook_resid_post"].shape == (len(b), 64)
    assert b.info["t"].unique().numel() == 1 and 0.05 <= float(b.info["t"][0]) <= 0.5  # one t per batch
    assert torch.equal(src.batch(0, 0).info["token"], b.info["token"])  # deterministic
    if policy == "all":
        assert 0 < masked.float().mean() < 1


def test_clean_policy_and_causal_default(llada, tiny_dirs):
    from dlmscope.hooks import run_with_cache
    from dlmscope.models import load_model

    rows = _rows(8)
    b = ActivationSource(llada, [HOOK], rows, policy="clean", seqs_per_batch=8).batch(0, 0)
    assert len(b) == rows.numel() and not b.info["masked"].any()
    ref = run_with_cache(llada, rows[torch.randperm(8, generator=torch.Generator().manual_seed(0))], [HOOK])[HOOK]
    torch.testing.assert_close(b.acts[HOOK], ref.reshape(-1, 64))
    causal = load_model(tiny_dirs["causal"])
    assert ActivationSource(causal, [HOOK], rows, seqs_per_batch=8).policy == "clean"
    with pytest.raises(DLMScopeError, match="needs a diffusion model"):
        ActivationSource(causal, [HOOK], rows, policy="mask", seqs_per_batch=8)


def test_shuffle_buffer_yields_each_token_once_per_pass(llada):
    src = ActivationSource(llada, [HOOK], _rows(), policy="all", seqs_per_batch=4)
    per_pass = len(src) * 4 * 16
    buf = ShuffleBuffer(src, capacity=128, batch_size=32, seed=0)
    seen = torch.cat([buf.next().acts[HOOK] for _ in range(per_pass // 32)])
    ref = torch.cat([src.batch(0, i).acts[HOOK] for i in range(len(src))])
    assert seen.shape == ref.shape
    order = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731 - rows sorted by their first value
    torch.testing.assert_close(order(seen), order(ref))  # every row of the pass exactly once
    assert not torch.equal(seen, ref)  # shuffled across forwards
    assert buf.epoch == 0
    buf.next()
    assert buf.epoch == 1  # the next pass starts only once this one is used up
    with pytest.raises(DLMScopeError, match="at least twice the batch size"):
        ShuffleBuffer(src, capacity=32, batch_size=32)


def test_shuffle_buffer_draws_in_place_and_snapshots_its_state(llada):
    """A draw moves only batch-many rows (no copy of the whole buffer per step); a saved state stays as saved."""
    src = ActivationSource(llada, [HOOK], _rows(), policy="all", seqs_per_batch=4)
    buf = ShuffleBuffer(src, capacity=128, batch_size=32, seed=0)
    buf.next()
    storage = buf.acts[HOOK].untyped_storage().data_ptr()
    saved = buf.state_dict()
    before = saved["acts"][HOOK].clone()
    drawn = buf.next()
    assert buf.acts[HOOK].untyped_storage().data_ptr() == storage  # edited in place, not re-gathered
    assert torch.equal(saved["acts"][HOOK], before)
    remaining = torch.cat([buf.acts[HOOK], drawn.acts[HOOK]])
    order = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731
    torch.testing.assert_close(order(remaining), order(before))  # the draw plus the rest is the buffer before


class _Failing:
    """A source whose batch 2 of every pass fails."""

    def __init__(self, src):
        self.src = src

    def __len__(self):
        return len(self.src)

    def batch(self, epoch, index):
        if index == 2:
            raise RuntimeError("broken batch")
        return self.src.batch(epoch, index)


def test_prefetcher_gives_the_same_batches_in_the_same_order(llada):
    src = ActivationSource(llada, [HOOK], _rows(), policy="mask", seqs_per_batch=4)
    plain = ShuffleBuffer(src, capacity=128, batch_size=32, seed=3)
    steps = 3 * len(src) * 4 * 16 // 32  # about three passes of the data
    expected, mid = [], None
    for i in range(steps):  # first without the thread: one model must not run two forwards at once
        expected.append(plain.next())
        mid = plain.state_dict() if i == steps // 2 else mid
    ahead = ShuffleBuffer(Prefetcher(src, 64), capacity=128, batch_size=32, seed=3)
    for i in range(steps):
        b = ahead.next()
        assert torch.equal(expected[i].acts[HOOK], b.acts[HOOK]), i
        assert torch.equal(expected[i].info["token"], b.info["token"]), i
        if i == steps // 2:  # a resume mid-pass: the saved state loaded again, the thread restarts there
            ahead.load_state_dict(mid)
    assert ahead.epoch >= 2
    ahead.source.close()
    first, fourth = src.batch(0, 0).acts[HOOK], src.batch(0, 3).acts[HOOK]
    failing = Prefetcher(_Failing(src), 64)
    assert torch.equal(failing.batch(0, 0).acts[HOOK], first)
    failing.batch(0, 1)
    with pytest.raises(RuntimeError, match="broken batch"):
        failing.batch(0, 2)
    assert torch.equal(failing.batch(0, 3).acts[HOOK], fourth)  # restarts after the error
    failing.close()


def test_mmap_safetensors_reads_what_safetensors_wrote_without_touching_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(5, 3, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g).half(),
               "c": torch.randn(2, 2, 2, generator=g), "d": torch.arange(9), "e": torch.tensor([True, False, True]),
               "f": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    before = (tmp_path / "x.safetensors").read_bytes()
    got, ref = mmap_safetensors(tmp_path / "x.safetensors"), load_file(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for k in tensors:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    got["c"].fill_(1.0)  # copy-on-write: the file keeps its bytes
    assert (tmp_path / "x.safetensors").read_bytes() == before


def test_cache_roundtrip_resume_and_corruption(llada, tmp_path):
    src = ActivationSource(llada, ["blocks.0.hook_resid_post", HOOK], _rows(), policy="mask", seqs_per_batch=8)
    write_cache(src, tmp_path / "c", progress=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["hooks"] == ["blocks.0.hook_resid_post", HOOK] and manifest["policy"] == "mask"
    assert manifest["t_range"] == [0.05, 0.5] and manifest["dtype"] == "float32"
    assert manifest["tokens"] == sum(s["tokens"] for s in manifest["shards"]) and len(manifest["shards"]) == 3
    cached = CachedSource(tmp_path / "c")
    assert len(cached) == len(src)
    for i in range(len(src)):
        a, b = cached.batch(0, i), src.batch(0, i)
        torch.testing.assert_close(a.acts[HOOK], b.acts[HOOK])
        assert all(torch.equal(a.info[k], b.info[k]) for k in b.info)
    assert [s["file"] for s in CachedSource(tmp_path / "c", shards=slice(1, None, 2)).shards] == ["shard-00001.safetensors"]
    shard = tmp_path / "c" / "shard-00001.safetensors"
    mtime = shard.stat().st_mtime_ns
    leftover = tmp_path / "c" / ".shard-00002.safetensors.k9x.tmp"  # what a writer killed mid-shard leaves
    leftover.write_bytes(b"\0" * 4096)
    write_cache(src, tmp_path / "c", progress=False)  # resumable: complete shards are kept
    assert shard.stat().st_mtime_ns == mtime
    assert not leftover.exists() and not (tmp_path / "c" / ".lock").exists()
    with pytest.raises(DLMScopeError, match="different configuration"):
        write_cache(ActivationSource(llada, [HOOK], _rows(), policy="all", seqs_per_batch=8), tmp_path / "c", progress=False)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DLMScopeError, match="missing or corrupt"):
        CachedSource(tmp_path / "c")
    write_cache(src, tmp_path / "c", progress=False)  # a corrupt shard is rewritten on resume
    CachedSource(tmp_path / "c")
    with pytest.raises(DLMScopeError, match="not an activation cache"):
        CachedSource(tmp_path)


@pytest.mark.parametrize("damage,message", [
    (lambda text: text[: len(text) // 2], "unreadable or truncated"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "shards"}), "needs model, hooks"),
    (lambda text: json.dumps({**json.loads(text), "hooks": []}), "needs model, hooks"),
    (lambda text: json.dumps({**json.loads(text), "shards": [{"file": "../x", "sha256": "0", "tokens": 1}]}),
     "bad shard entry"),
    (lambda text: json.dumps({**json.loads(text), "shards": []}), "none left for this source"),
])
def test_damaged_manifest_is_one_line(llada, tmp_path, damage, message):
    """Readers and a resumed write reject a damaged manifest before touching shards."""
    write_cache(ActivationSource(llada, [HOOK], _rows(16), policy="mask", seqs_per_batch=8), tmp_path, progress=False)
    path = tmp_path / "manifest.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(DLMScopeError, match=message) as e:
        CachedSource(tmp_path)
    assert "\n" not in str(e.value)
    if "none left" not in message:  # an empty shard list is a valid start for the writer
        with pytest.raises(DLMScopeError, match=message):
            write_cache(ActivationSource(llada, [HOOK], _rows(16), policy="mask", seqs_per_batch=8), tmp_path,
                        progress=False)


def test_cache_bfloat16_and_cli(llada, tiny_dirs, tmp_path):
    from dlmscope.cli import main

    src = ActivationSource(llada, [HOOK], _rows(), policy="mask", seqs_per_batch=8)
    write_cache(src, tmp_path / "bf", n_batches=1, dtype=torch.bfloat16, progress=False)
    got = CachedSource(tmp_path / "bf").batch(0, 0).acts[HOOK]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, src.batch(0, 0).acts[HOOK], atol=0.05, rtol=0.02)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"document {i} says {' '.join(['words'] * 20)}" for i in range(40)))
    main(["cache", "--out", str(tmp_path / "cli"), "--model", str(tiny_dirs["llada"]), "--layers", "0,1", "--batches", "2",
          "--seqs-per-forward", "4", "--context-length", "16", "--dataset", str(text)])
    assert len(CachedSource(tmp_path / "cli")) == 2


def test_trajectory_activations(llada):
    batches = trajectory_activations(llada, ["a b", "c d e"], ["blocks.0.hook_resid_post", HOOK], at_steps=[0, 3],
                                     gen_length=8, steps=4, block_length=8)
    assert [int(b.info["step"][0]) for b in batches] == [0, 3]
    first, last = batches
    assert first.acts[HOOK].shape == (len(first), 64) and set(first.info["doc"].tolist()) == {0, 1}
    assert first.info["masked"].sum() == 16 and float(first.info["t"][0]) == 1.0  # all 8 x 2 generated masked
    assert last.info["masked"].sum() == 4 and float(last.info["t"][0]) == 0.25
    assert (first.info["token"][first.info["masked"]] == llada.mask_id).all()
    masked_only = trajectory_activations(llada, ["a b"], [HOOK], at_steps=[1], positions="masked",
                                         gen_length=8, steps=4, block_length=8)
    assert len(masked_only) == 1 and masked_only[0].info["masked"].all() and len(masked_only[0]) == 6
    with pytest.raises(DLMScopeError, match="unknown positions"):
        trajectory_activations(llada, ["a"], [HOOK], positions="odd")


def test_manifest_lists_shards_in_numeric_order(tmp_path):
    from dlmscope.activations.cache import _save_manifest

    done = {f"shard-{i:05d}.safetensors": {"file": f"shard-{i:05d}.safetensors", "tokens": i, "sha256": "x"}
            for i in (100000, 99999, 7)}
    manifest = {"model": "m"}
    _save_manifest(tmp_path / "manifest.json", manifest, done)
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["tokens"] for s in saved["shards"]] == [7, 99999, 100000] and saved["tokens"] == 200006


def test_paired_source_runs_every_checkpoint_on_the_same_batch(llada):
    from dlmscope.activations import PairedActivationSource

    single = ActivationSource(llada, [HOOK], _rows(), seqs_per_batch=8, seed=3).batch(1, 2)
    paired = PairedActivationSource([llada, llada], [HOOK], _rows(), seqs_per_batch=8, seed=3).batch(1, 2)
    assert paired.acts[HOOK].shape == (len(single), 128)
    assert torch.equal(paired.acts[HOOK][:, :64], single.acts[HOOK])
    assert torch.equal(paired.acts[HOOK][:, 64:], single.acts[HOOK])
    assert all(torch.equal(paired.info[k], single.info[k]) for k in single.info)
    with pytest.raises(DLMScopeError, match="at least two checkpoints"):
        PairedActivationSource([llada], [HOOK], _rows(), seqs_per_batch=8)
