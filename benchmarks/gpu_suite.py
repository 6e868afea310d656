"""The GPU suite: one short script (a few minutes on one H100/H200) measuring dlmscope at LLaDA-8B's scale.

A randomly initialised model with LLaDA-8B's real shape (32 layers, d_model 4096, 32 heads, SwiGLU 12,288,
vocab 126,464, mask id 126,336) in bfloat16, built on the device (no weights are read; `--layers N` keeps
the first N layers if memory demands, and the output says so). Measured, each with its peak GPU memory:

1. capture of 4 residual-stream layers (`dlmscope.hooks.capture`, to the device) vs the bare forward:
   overhead (target <= 5%) and tokens/s, interleaved, medians;
2. SAE training at d_in 4,096, 16,384 latents, k 64, batch 4,096 on activations captured from the model:
   tokens/s of our trainer with each optimiser (adam, signum_sf; AuxK runs once latents die, after 6 steps here),
   eai-sparsify's on the same batches (skipped when sparsify is not installed), and each of our steps as a
   multiple of its floor (one dense encode GEMM + top-k, `bench_sae_floor.py`);
3. the sampler: denoising steps/s generating 256 tokens, plain and with Fast-dLLM's prefix and dual KV cache.

    python benchmarks/gpu_suite.py                       # the GPU run: writes benchmarks/results/gpu.{json,md}
    python benchmarks/gpu_suite.py --tiny --out /tmp/g   # the same code on CPU at a tiny shape (tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Shape:
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    vocab: int
    mask_id: int
    batch: int
    """Sequences per forward in the capture test."""
    seq_len: int
    latents: int
    k: int
    sae_batch: int
    sae_steps: int
    gen_length: int
    gen_steps: int
    block_length: int


LLADA_8B = Shape(4096, 32, 32, 12288, 126464, 126336, batch=8, seq_len=1024, latents=16384, k=64, sae_batch=4096,
                 sae_steps=30, gen_length=256, gen_steps=64, block_length=32)
TINY = Shape(64, 4, 4, 128, 512, 511, batch=2, seq_len=32, latents=256, k=8, sae_batch=64, sae_steps=4,
             gen_length=16, gen_steps=4, block_length=8)


class Device:
    """Timing and peak memory on one device (CUDA or CPU, where memory is not measured)."""

    def __init__(self, name: str):
        self.name, self.cuda = name, name.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.name)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.name)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.name) / 2**30 if self.cuda else None

    def timed(self, fn, repeats: int, warmup: int = 1) -> tuple[float, float | None]:
        """(median seconds, peak GiB) of fn()."""
        for _ in range(warmup):
            fn()
        self.reset_peak()
        times = []
        for _ in range(repeats):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times), self.peak_gib()


def build_model(shape: Shape, layers: int, device: str, dtype: torch.dtype):
    """LLaDA's architecture (a bidirectional Llama) with random weights, made directly on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlmscope.models.checkpoint import wrap_decoder

    config = LlamaConfig(hidden_size=shape.d_model, num_hidden_layers=layers, num_attention_heads=shape.n_heads,
                         num_key_value_heads=shape.n_heads, intermediate_size=shape.d_mlp, vocab_size=shape.vocab,
                         rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)
    return wrap_decoder(module, family="llada", name=f"random-llada-{layers}L", tokenizer=None,
                        mask_id=shape.mask_id, shift=False, causal=False)


def bench_capture(lm, shape: Shape, dev: Device, repeats: int) -> tuple[dict, torch.Tensor]:
    """Bare forward vs forward capturing 4 layers, alternating; returns the last captured layer's activations."""
    from dlmscope.hooks import capture

    n = lm.n_layers
    hooks = [f"blocks.{i}.hook_resid_post" for i in sorted({n // 8, n // 4, n // 2, (3 * n) // 4})][:4]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.mask_id, (shape.batch, shape.seq_len), generator=gen).to(dev.name)
    kept: dict = {}

    @torch.no_grad()
    def bare():
        lm.forward(ids)

    @torch.no_grad()
    def captured():
        with capture(lm, hooks) as cache:
            lm.forward(ids)
        kept["acts"] = cache.acts[hooks[-1]][0]

    times: dict[str, list[float]] = {"bare": [], "capture": []}
    peaks: dict[str, float | None] = {}
    for name, fn in (("bare", bare), ("capture", captured)):
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in (("bare", bare), ("capture", captured)):
            dev.reset_peak()
            dev.sync()
            t = time.perf_counter()
            fn()
            dev.sync()
            times[name].append(time.perf_counter() - t)
            peaks[name] = dev.peak_gib()
    bare_s, cap_s = statistics.median(times["bare"]), statistics.median(times["capture"])
    tokens = shape.batch * shape.seq_len
    return {"hooks": hooks, "tokens_per_forward": tokens, "bare_s": bare_s, "capture_s": cap_s,
            "overhead": cap_s / bare_s - 1, "bare_tokens_per_s": tokens / bare_s,
            "capture_tokens_per_s": tokens / cap_s, "peak_gib_bare": peaks["bare"],
            "peak_gib_capture": peaks["capture"]}, kept["acts"]


def bench_sae(acts: torch.Tensor, shape: Shape, dev: Device, repeats: int) -> dict:
    """Our trainer vs sparsify on the same batches of captured activations, and our step vs its floor."""
    from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig

    x = acts.reshape(-1, acts.shape[-1]).float()
    reps = -(-shape.sae_batch * shape.sae_steps // x.shape[0])  # repeat the captured tokens to fill the steps
    x = x.repeat(reps, 1)[: shape.sae_batch * shape.sae_steps]
    batches = list(x.split(shape.sae_batch))
    d, total = x.shape[1], shape.sae_batch * shape.sae_steps
    out: dict = {"d_in": d, "latents": shape.latents, "k": shape.k, "batch": shape.sae_batch, "steps": len(batches)}
    runners = {name: SAETrainer(SAEConfig(d, shape.latents, shape.k),
                                TrainConfig(total_tokens=total, batch_size=shape.sae_batch, autocast_bf16=dev.cuda,
                                            optimizer=optimizer), dev.name).step
               for name, optimizer in (("dlmscope", "adam"), ("dlmscope signum_sf", "signum_sf"))}
    if importlib.util.find_spec("sparsify") is not None:
        import bench_sae_train as bst  # a sibling script: its folder is on sys.path when this one runs

        lr = 2e-4 / (shape.latents / 2**14) ** 0.5
        runners["sparsify"] = bst.Sparsify(d, shape.latents, shape.k, lr, total, shape.sae_batch,
                                           min(10_000_000, total // 5), dev.name).step
    else:
        out["sparsify"] = "skipped: sparsify is not installed"
    for name, step in runners.items():
        step(batches[0])  # warm-up (and initialisation)
        dev.reset_peak()
        dev.sync()
        t = time.perf_counter()
        for b in batches[1:]:
            step(b)
        dev.sync()
        seconds = time.perf_counter() - t
        out[name] = {"tokens_per_s": shape.sae_batch * (len(batches) - 1) / seconds, "peak_gib": dev.peak_gib()}
    if isinstance(out.get("sparsify"), dict):
        for name in ("dlmscope", "dlmscope signum_sf"):
            out[f"{name.replace(' ', '_')}_over_sparsify"] = out[name]["tokens_per_s"] / out["sparsify"]["tokens_per_s"]
    import bench_sae_floor as floors

    for key, optimizer in (("floor", "adam"), ("floor_signum_sf", "signum_sf")):
        floor = floors.step_vs_floor(d, shape.latents, shape.k, shape.sae_batch, dev.name, repeats=repeats,
                                     optimizer=optimizer)
        out[key] = {k: floor[k] for k in ("step_s", "floor_s", "step_over_floor")}
    return out


def bench_sampler(lm, shape: Shape, dev: Device, repeats: int) -> dict:
    """Denoising steps/s for `gen_length` tokens: plain, and with Fast-dLLM's prefix and dual KV cache."""
    from dlmscope import generate

    prompt = torch.randint(0, shape.mask_id, (1, 32), generator=torch.Generator().manual_seed(1))
    kw = dict(gen_length=shape.gen_length, steps=shape.gen_steps, block_length=shape.block_length)
    out: dict = {"gen_length": shape.gen_length, "steps": shape.gen_steps, "block_length": shape.block_length}
    variants = {"no cache": {}, "prefix cache": {"cache": "prefix"}, "dual cache": {"cache": "dual"}}
    for name, extra in variants.items():
        seconds, peak = dev.timed(lambda: generate(lm, prompt, **kw, **extra), repeats)
        out[name] = {"steps_per_s": shape.gen_steps / seconds, "seconds": seconds, "peak_gib": peak}
    return out


def markdown(r: dict) -> str:
    c, s, g = r["capture"], r["sae"], r["sampler"]

    def gib(v):
        return "-" if v is None else f"{v:.1f} GiB"

    rows = [
        "| measurement | result | peak memory |", "|---|---|---|",
        f"| bare forward ({c['tokens_per_forward']} tokens) | {c['bare_tokens_per_s']:,.0f} tok/s | "
        f"{gib(c['peak_gib_bare'])} |",
        f"| capture of 4 layers | {c['capture_tokens_per_s']:,.0f} tok/s, overhead {c['overhead']:+.1%} "
        f"(target <= 5%) | {gib(c['peak_gib_capture'])} |",
        f"| SAE training (d_in {s['d_in']}, {s['latents']:,} latents, k {s['k']}, batch {s['batch']}) | "
        f"adam {s['dlmscope']['tokens_per_s']:,.0f} tok/s, {s['floor']['step_over_floor']:.2f}x the floor | "
        f"{gib(s['dlmscope']['peak_gib'])} |",
        f"| the same with `--optimizer signum_sf` | {s['dlmscope signum_sf']['tokens_per_s']:,.0f} tok/s, "
        f"{s['floor_signum_sf']['step_over_floor']:.2f}x the floor | {gib(s['dlmscope signum_sf']['peak_gib'])} |",
    ]
    if isinstance(s.get("sparsify"), dict):
        rows.append(f"| sparsify on the same batches | {s['sparsify']['tokens_per_s']:,.0f} tok/s "
                    f"(dlmscope adam {s['dlmscope_over_sparsify']:.2f}x, signum_sf "
                    f"{s['dlmscope_signum_sf_over_sparsify']:.2f}x) | {gib(s['sparsify']['peak_gib'])} |")
    else:
        rows.append(f"| sparsify | {s['sparsify']} | - |")
    for name in ("no cache", "prefix cache", "dual cache"):
        rows.append(f"| sampler, {g['gen_length']} tokens, {g['steps']} steps, {name} | "
                    f"{g[name]['steps_per_s']:.1f} steps/s | {gib(g[name]['peak_gib'])} |")
    return f"{r['model']} on {r['device_name']}\n\n" + "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on CPU (what the tests run)")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0 = all)")
    p.add_argument("--device", default="")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for gpu.json and gpu.md")
    args = p.parse_args()
    from dlmscope.io_utils import atomic_write_json, atomic_write_text

    shape = TINY if args.tiny else LLADA_8B
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dev = Device(device)
    layers = args.layers or shape.n_layers
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    t0 = time.time()
    lm = build_model(shape, layers, device, dtype)
    which = "all" if layers == shape.n_layers else f"the first {layers} of"
    model = (f"random {'tiny' if args.tiny else 'LLaDA-8B'}-shaped model ({which} {shape.n_layers} layers, "
             f"d_model {shape.d_model}, {str(dtype).replace('torch.', '')}, {lm.n_params() / 1e9:.2f}B parameters)")
    print(model, f"built in {time.time() - t0:.0f} s")
    capture, acts = bench_capture(lm, shape, dev, args.repeats)
    print(f"capture: overhead {capture['overhead']:+.1%}, {capture['capture_tokens_per_s']:,.0f} tok/s")
    sae = bench_sae(acts, shape, dev, args.repeats)
    print(f"SAE: {sae['dlmscope']['tokens_per_s']:,.0f} tok/s, {sae['floor']['step_over_floor']:.2f}x the floor")
    sampler = bench_sampler(lm, shape, dev, max(1, args.repeats // 2))
    device_name = torch.cuda.get_device_name(device) if dev.cuda else (platform.processor() or platform.machine())
    result = {"model": model, "tiny": args.tiny, "layers": layers, "device": device, "device_name": device_name,
              "torch": torch.__version__, "capture": capture, "sae": sae, "sampler": sampler,
              "seconds": time.time() - t0}
    out = Path(args.out)
    atomic_write_json(out / "gpu.json", result)
    atomic_write_text(out / "gpu.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
