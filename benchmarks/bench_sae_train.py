"""Top-K SAE training: dlmscope vs SAELens vs sparsify, side by side on the same cached activations.

Activations (N, d_in) are made once and cached under `.cache/bench/`: `--source dlm` (default) takes
the built-in DLM's layer-3 residual stream under DLM-Scope masking (d_in 256); `--source synthetic`
draws sparse codes over a random unit dictionary plus noise. The last `--heldout` vectors are held out.
All three train the same width, k and batch on the same batches in the same order, with AuxK (coef
1/32, k_aux d_in/2, the same dead window), and their steps are interleaved batch by batch so background
load hits them alike. Each runs its own training step:

- dlmscope: `SAETrainer.step` (Adam, lr 2e-4/sqrt(n/2^14), constant: no warm-up or decay here).
- SAELens: `TopKTrainingSAE.training_forward_pass` + backward + clip_grad_norm(1) + Adam, as in its
  `SAETrainer._train_step`, same lr, inputs scaled by its `ActivationScaler` (expected_average_only_in).
- sparsify: `SparseCoder` forward (FVU loss + AuxK) + backward + parallel-gradient removal + its own
  default optimiser (signum, schedule-free, lr 5e-3/sqrt(n/2^14)), b_dec = mean of the first batch.
- sparsify-adam: the same with Adam at our lr, so the FVU comparison can also be made at one optimiser.

Reported: training tokens/s (timed steps after `--warmup` steps) and textbook FVU on the held-out set
after the same tokens; ratios dlmscope / other. JSON goes to benchmarks/results/sae_train.json.

    python benchmarks/bench_sae_train.py [--source dlm|synthetic] [--tokens 200000] [--latents 4096]
        [--trainers dlmscope,sparsify] [--out benchmarks/results/sae_train_1m.json]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def dlm_activations(n: int, device: str, model: str = "dlmscope-tiny-dlm") -> torch.Tensor:
    """Layer 3's residual stream of `model` on the built-in text under DLM-Scope masking (one t per forward)."""
    from dlmscope.activations import ActivationSource
    from dlmscope.data import load_texts, pack
    from dlmscope.models import load_model

    lm = load_model(model, device=device)
    rows = pack(lm.tokenizer, load_texts("builtin"), 128)
    hook = "blocks.3.hook_resid_post"
    src = ActivationSource(lm, [hook], rows.input_ids, policy="all", seqs_per_batch=64)
    acts, got, epoch, i = [], 0, 0, 0
    while got < n:  # further epochs draw new masks over the same text
        if i == len(src):
            epoch, i = epoch + 1, 0
        a = src.batch(epoch, i).acts[hook].float().cpu()
        acts.append(a)
        got, i = got + a.shape[0], i + 1
    return torch.cat(acts)[:n]


def synthetic_activations(n: int, d: int = 256, atoms: int = 2048, active: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(atoms, d, generator=gen), dim=1)
    freq = torch.rand(atoms, generator=gen) ** 4 + 1e-3  # power-law-ish feature frequencies
    idx = torch.multinomial(freq, n * active, replacement=True, generator=gen).view(n, active)
    coef = torch.rand(n, active, generator=gen) * 3
    x = torch.nn.functional.embedding_bag(idx, D, per_sample_weights=coef, mode="sum")
    return x + 0.05 * torch.randn(n, d, generator=gen) + 2.0 * D[0]  # noise and a mean offset


def cached_activations(source: str, n: int, device: str) -> torch.Tensor:
    """The first n activations of `source`, cached; the DLM's are made batch by batch in a fixed order, so a longer
    cached run's first n are the same vectors and are reused."""
    path = ROOT / ".cache" / "bench" / f"acts_{source}_{n}.pt"
    longer = sorted((int(p.stem.rsplit("_", 1)[1]), p) for p in path.parent.glob(f"acts_{source}_*.pt")
                    if p.stem.rsplit("_", 1)[1].isdigit())
    longer = [p for m, p in longer if m > n]
    if not path.is_file() and source == "dlm" and longer:
        return torch.load(longer[0], weights_only=True)[:n].clone()
    if not path.is_file():
        from dlmscope.io_utils import atomic_torch_save

        x = dlm_activations(n, device) if source == "dlm" else synthetic_activations(n)
        atomic_torch_save(path, x)
    return torch.load(path, weights_only=True)


class Ours:
    name = "dlmscope"

    def __init__(self, d, n, k, lr, total, bs, dead, device):
        from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig

        self.tr = SAETrainer(SAEConfig(d, n, k), TrainConfig(total_tokens=total, batch_size=bs, lr=lr, warmup_steps=0,
                                                             decay_fraction=0.0, dead_tokens=dead, optimizer="adam"),
                             device)

    def step(self, x):
        self.tr.step(x)

    def reconstruct(self, x):
        with torch.no_grad():
            return self.tr.sae.reconstruct(x)


class SAELens:
    name = "saelens"

    def __init__(self, d, n, k, lr, total, bs, dead, device):
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, aux_loss_coefficient=1 / 32,
                                                         device=device))
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr, betas=(0.9, 0.999))
        self.since = torch.zeros(n, device=device)
        self.dead, self.steps, self.scaler = dead, 0, None

    def step(self, x):
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.training.activation_scaler import ActivationScaler

        if self.scaler is None:  # expected_average_only_in: mean norm sqrt(d_in), estimated from the first batch
            self.scaler = ActivationScaler(math.sqrt(x.shape[1]) / float(x.norm(dim=-1).mean()))
        x = self.scaler.scale(x)
        self.sae.train()
        out = self.sae.training_forward_pass(TrainStepInput(x, {}, self.since >= self.dead, self.steps, False))
        with torch.no_grad():
            self.since += x.shape[0]
            self.since[out.feature_acts.bool().any(0)] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1

    def reconstruct(self, x):
        with torch.no_grad():
            return self.scaler.unscale(self.sae.decode(self.sae.encode(self.scaler.scale(x))))


class Sparsify:
    """sparsify's SparseCoder and its default optimiser (signum, schedule-free)."""

    name = "sparsify"

    def __init__(self, d, n, k, lr, total, bs, dead, device):
        from sparsify import SparseCoder, SparseCoderConfig

        self.sc = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device)
        self.opt = self.optimiser(n, lr)
        self.since = torch.zeros(n, dtype=torch.long, device=device)
        self.dead, self.first = dead, True

    def optimiser(self, n, lr):
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD([{"params": self.sc.parameters(), "lr": 5e-3 / (n / 2**14) ** 0.5}]),
                                  momentum=0.95)
        opt.train()
        return opt

    def step(self, x):
        if self.first:
            self.sc.b_dec.data = x.mean(0)
            self.first = False
        self.sc.set_decoder_norm_to_unit_norm()
        out = self.sc(x, dead_mask=self.since > self.dead)
        (out.fvu + out.auxk_loss / 32).backward()
        with torch.no_grad():
            self.since += x.shape[0]
            self.since[out.latent_indices.flatten()] = 0
        self.sc.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()

    def reconstruct(self, x):
        with self._evaluated():
            return self.sc(x).sae_out

    def encode_topk(self, x):
        """(values, indices) of the top-k latents per row, with the weights `reconstruct` evaluates."""
        with self._evaluated():
            out = self.sc.encode(x)
            return out.top_acts, out.top_indices

    @contextmanager
    def _evaluated(self):
        averaged = hasattr(self.opt, "eval")  # schedule-free: evaluate the averaged weights
        if averaged:
            self.opt.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if averaged:
                self.opt.train()


class SparsifyAdam(Sparsify):
    """The same SparseCoder with its Adam option at our lr (no warm-up, like ours here): same optimiser as ours."""

    name = "sparsify-adam"

    def optimiser(self, n, lr):
        return torch.optim.Adam(self.sc.parameters(), lr=lr, betas=(0.9, 0.999))


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


NAMES = {"dlmscope": "dlmscope", "saelens": "SAELens", "sparsify": "sparsify", "sparsify-adam": "sparsify with Adam"}


def readme_rows(res: dict, label: str, first: bool) -> list[str]:
    """The README summary's rows of one run: the first run in two rows (1-decimal speedups), later runs in one."""
    t = res["trainers"]
    others = [n for n in t if n != "dlmscope"]
    rate = f"dlmscope {t['dlmscope']['tokens_per_s']:,.0f} tok/s"
    if first:
        return [f"| {label} | training throughput | {rate}: "
                + ", ".join(f"{t[n]['dlmscope_speedup']:.1f}x {NAMES[n]}" for n in others) + " |",
                "| | held-out FVU after the same tokens | "
                + ", ".join(f"{NAMES[n].replace(' with Adam', '-Adam')} {t[n]['fvu']:.3f}" for n in t) + " |"]
    return [f"| {label} | throughput / FVU | {rate}, "
            + ", ".join(f"{t[n]['dlmscope_speedup']:.2f}x {n.replace('-adam', '-Adam')}" for n in others)
            + f"; FVU {t['dlmscope']['fvu']:.3f} vs " + " / ".join(f"{t[n]['fvu']:.3f}" for n in others) + " |"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=["dlm", "synthetic"], default="dlm")
    p.add_argument("--tokens", type=int, default=200_000, help="cached activations in all (train + held-out)")
    p.add_argument("--heldout", type=int, default=16_384)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--trainers", default="dlmscope,saelens,sparsify,sparsify-adam", help="comma-separated subset to run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae_train.json"))
    args = p.parse_args()
    from dlmscope.io_utils import atomic_write_json

    torch.manual_seed(0)
    x = cached_activations(args.source, args.tokens, args.device)
    train, held = x[:-args.heldout], x[-args.heldout:].to(args.device)
    d, steps = x.shape[1], (x.shape[0] - args.heldout) // args.batch
    batches = [b.to(args.device) for b in train[: steps * args.batch].split(args.batch)]
    lr, total = 2e-4 / math.sqrt(args.latents / 2**14), steps * args.batch
    dead = min(10_000_000, total // 5)
    runners = [cls(d, args.latents, args.k, lr, total, args.batch, dead, args.device)
               for cls in (Ours, SAELens, Sparsify, SparsifyAdam) if cls.name in args.trainers.split(",")]
    seconds = {r.name: 0.0 for r in runners}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for i, b in enumerate(batches):
        for r in runners:  # interleaved, so drifting background load is shared
            sync()
            t = time.perf_counter()
            r.step(b)
            sync()
            if i >= args.warmup:
                seconds[r.name] += time.perf_counter() - t
    timed = (steps - args.warmup) * args.batch
    results = {"device": args.device, "torch_threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(),
               "source": args.source, "d_in": d, "latents": args.latents, "k": args.k, "batch": args.batch,
               "train_tokens": total, "timed_tokens": timed, "heldout_tokens": args.heldout, "lr_adam": lr,
               "dead_window_tokens": dead, "trainers": {}}
    for r in runners:
        results["trainers"][r.name] = {"tokens_per_s": timed / seconds[r.name], "fvu": fvu(held, r.reconstruct(held))}
    ours = results["trainers"]["dlmscope"]
    print(f"{args.source} activations, d_in={d}, {args.latents} latents, k={args.k}, batch {args.batch}, "
          f"{total} training tokens, device {args.device}")
    print(f"{'trainer':<10} {'tokens/s':>10} {'dlmscope speed-up':>18} {'held-out FVU':>13}")
    for name, r in results["trainers"].items():
        r["dlmscope_speedup"] = ours["tokens_per_s"] / r["tokens_per_s"]
        print(f"{name:<10} {r['tokens_per_s']:>10.0f} {r['dlmscope_speedup']:>17.2f}x {r['fvu']:>13.4f}")
    atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
