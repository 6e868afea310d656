"""Top-K SAE training throughput: dlmscope vs SAELens vs sparsify on the same cached activations.

Same activations (the built-in DLM's layer-3 residual stream, DLM-Scope masking), width, k, batch and
Adam learning rate; each trainer runs its own step (forward, loss incl. AuxK, backward, its own
decoder-norm handling). Tokens/s are taken in one run, each trainer timed over the same steps after a
warm-up, and FVU (textbook formula, same held-out set) after the same tokens.

    python benchmarks/bench_sae_train.py [--tokens 400000] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def activations(n_tokens: int, device: str) -> torch.Tensor:
    from dlmscope.activations import ActivationSource
    from dlmscope.data import load_texts, pack
    from dlmscope.models import load_model

    lm = load_model("dlmscope-tiny-dlm", device=device)
    rows = pack(lm.tokenizer, load_texts("builtin"), 128)
    src = ActivationSource(lm, ["blocks.3.hook_resid_post"], rows.input_ids, policy="all", seqs_per_batch=64)
    acts, got, i = [], 0, 0
    while got < n_tokens:
        a = src.batch(0, i).acts["blocks.3.hook_resid_post"]
        acts.append(a)
        got, i = got + a.shape[0], i + 1
    return torch.cat(acts)[:n_tokens].to(device)


@torch.no_grad()
def fvu(x, x_hat) -> float:
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def ours(d, n, k, lr, total, bs, device):
    from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig

    tr = SAETrainer(SAEConfig(d, n, k), TrainConfig(total_tokens=total, batch_size=bs, lr=lr, warmup_steps=1,
                                                   decay_fraction=0.0), device)
    return tr.step, torch.no_grad()(tr.sae.reconstruct)


def saelens(d, n, k, lr, total, bs, device):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device=device))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since = torch.zeros(n, device=device)
    state = {"step": 0}

    def step(x):
        dead = since > total // 5
        out = sae.training_forward_pass(TrainStepInput(x, {}, dead, state["step"], False))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            since.add_(x.shape[0])
            since[(out.feature_acts > 0).any(0)] = 0
        state["step"] += 1

    def recon(x):
        with torch.no_grad():
            return sae.decode(sae.encode(x))

    return step, recon


def sparsify_(d, n, k, lr, total, bs, device):
    from sparsify import SparseCoder, SparseCoderConfig

    sc = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device)
    opt = torch.optim.Adam(sc.parameters(), lr=lr)
    since = torch.zeros(n, device=device)

    def step(x):
        out = sc(x, dead_mask=since > total // 5)
        loss = out.fvu + out.auxk_loss / 32
        opt.zero_grad()
        loss.backward()
        sc.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sc.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            since.add_(x.shape[0])
            since[out.latent_indices.flatten()] = 0

    def recon(x):
        with torch.no_grad():
            return sc(x).sae_out

    return step, recon


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=400_000)
    p.add_argument("--latents", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    x = activations(args.tokens + 16384, args.device)
    train, held = x[:-16384], x[-16384:]
    d = x.shape[1]
    lr = 2e-4 / (args.latents / 2**14) ** 0.5
    results = {"device": args.device, "tokens": args.tokens, "d_in": d, "latents": args.latents, "k": args.k,
               "batch": args.batch}
    for name, make in (("dlmscope", ours), ("saelens", saelens), ("sparsify", sparsify_)):
        step, recon = make(d, args.latents, args.k, lr, args.tokens, args.batch, args.device)
        batches = train.split(args.batch)[: args.tokens // args.batch]
        for b in batches[:3]:  # warm-up, also initialises data-dependent parts
            step(b)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for b in batches[3:]:
            step(b)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        results[name] = {"tokens_per_s": (len(batches) - 3) * args.batch / seconds, "fvu": fvu(held, recon(held))}
    for name in ("saelens", "sparsify"):
        results[f"speed_vs_{name}"] = results["dlmscope"]["tokens_per_s"] / results[name]["tokens_per_s"]
    out = Path(__file__).parent / "results" / f"sae_train_{args.device.split(':')[0]}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
