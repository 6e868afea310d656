"""Rebuild the built-in twins `dlmscope-tiny-dlm` and `dlmscope-tiny-ar` reproducibly.

Three stages, so the heavy one can run on a GPU machine that has neither this Python's standard
library (the corpus comes from it) nor our optional dependencies:

    python experiments/train_zoo.py prepare                 # corpus -> tokenizer -> token tensors
    python experiments/train_zoo.py train --device cuda     # both twins, same data, same tokens
    python experiments/train_zoo.py assemble                # checkpoint folders + MODEL_CARD.md

`all` runs the three in a row. Everything is seeded; the log of each stage lands in the work folder.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlmscope.diffusion.loss import elbo_loss, next_token_ce, token_ce  # noqa: E402
from dlmscope.diffusion.noise import corrupt, sample_t  # noqa: E402
from dlmscope.models.checkpoint import wrap_decoder  # noqa: E402
from dlmscope.models.tiny import tiny_llama  # noqa: E402
from dlmscope.runtime import progress  # noqa: E402

WORK = ROOT / ".cache" / "zoo"
ZOO = ROOT / "dlmscope" / "zoo"


@dataclass
class ZooConfig:
    """Size, data mix and optimisation of both twins (identical for the two)."""

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    d_mlp: int = 768
    context_length: int = 128
    sudoku_train: int = 10000
    """Sudoku puzzles (train split) mixed into the corpus as documents."""
    countdown_train: int = 5000
    task_repeats: int = 1
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 300
    weight_decay: float = 0.1
    seed: int = 0


def prepare(cfg: ZooConfig) -> None:
    """Corpus + task text -> BPE tokenizer -> packed train / held-out token tensors."""
    from dlmscope.data import DEBIAN_DOCS, builtin_corpus, pack
    from dlmscope.tasks import get_task
    from dlmscope.tokenizer import train_tokenizer

    debian = DEBIAN_DOCS.is_dir()  # the larger corpus when installed; recorded in prepare.json
    train_docs, heldout_docs = builtin_corpus("train", debian), builtin_corpus("heldout", debian)
    rng = random.Random(cfg.seed)
    task_docs = []
    for name, n in (("sudoku", cfg.sudoku_train), ("countdown", cfg.countdown_train)):
        task = get_task(name)
        task_docs += [ex.prompt + ex.answer for ex in task.examples("pretrain", n, seed=cfg.seed)]
    docs = train_docs + task_docs * cfg.task_repeats
    rng.shuffle(docs)
    tokenizer = train_tokenizer(train_docs + task_docs, vocab_size=cfg.vocab_size)
    WORK.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(WORK / "tokenizer"))
    train = pack(tokenizer, docs, cfg.context_length)
    heldout = pack(tokenizer, heldout_docs, cfg.context_length)
    torch.save({"train": train.input_ids, "heldout": heldout.input_ids, "mask_id": tokenizer.mask_token_id,
                "config": asdict(cfg)}, WORK / "data.pt")
    stats = {"debian_python3.11_doc": debian, "train_docs": len(train_docs), "task_docs": len(task_docs), "heldout_docs": len(heldout_docs),
             "train_tokens": train.input_ids.numel(), "heldout_tokens": heldout.input_ids.numel()}
    (WORK / "prepare.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))


def _lr(step: int, cfg: ZooConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(lm, kind: str, data: dict, device: str) -> float:
    """Held-out training objective with fixed masks, to watch for over-fitting."""
    x0 = data["heldout"][:128].to(device)
    gen = torch.Generator().manual_seed(1234)
    if kind == "ar":
        return float(next_token_ce(lm.forward(x0), x0).mean())
    c = corrupt(x0, data["mask_id"], sample_t(x0.shape[0], generator=gen), generator=gen)
    return float(elbo_loss(lm.forward(c.xt), x0, c))


def train_one(kind: str, data: dict, cfg: ZooConfig, device: str, out: Path) -> dict:
    """Train one twin: `dlm` with the masked-diffusion ELBO, `ar` with next-token loss, same batches."""
    module = tiny_llama(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_mlp=cfg.d_mlp,
                        vocab_size=cfg.vocab_size, seed=cfg.seed)
    with torch.no_grad():  # standard small init (the tiny builder's is meant for tests)
        for name, p in module.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    module.to(device).train()
    lm = wrap_decoder(module, family="llada" if kind == "dlm" else "causal", name=kind, tokenizer=None,
                      mask_id=data["mask_id"], shift=False, causal=kind == "ar")
    decay = [p for n, p in module.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in module.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    train_ids = data["train"]
    gen = torch.Generator().manual_seed(cfg.seed)
    log = []
    t0 = time.time()
    use_amp = device.startswith("cuda")
    bar = progress(range(cfg.steps), desc=f"train {kind}")
    for step in bar:
        rows = torch.randint(0, train_ids.shape[0], (cfg.batch_size,), generator=gen)
        x0 = train_ids[rows].to(device)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            if kind == "dlm":
                c = corrupt(x0, data["mask_id"], sample_t(x0.shape[0], generator=gen), generator=gen)
                loss = elbo_loss(lm.forward(c.xt), x0, c)
            else:
                loss = next_token_ce(lm.forward(x0), x0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            entry = {"step": step, "loss": loss.item(), "lr": _lr(step, cfg), "seconds": time.time() - t0}
            if step % 500 == 0 or step == cfg.steps - 1:
                entry["heldout_loss"] = heldout_loss(lm, kind, data, device)
            log.append(entry)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    module.eval()
    from safetensors.torch import save_file

    save_file({k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in module.state_dict().items()},
              str(out / f"{kind}.safetensors"))
    tokens = cfg.steps * cfg.batch_size * cfg.context_length
    return {"log": log, "seconds": time.time() - t0, "tokens_seen": tokens, "device": device}


def train(cfg: ZooConfig, device: str, data_path: Path, out: Path) -> None:
    data = torch.load(data_path)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    result = {kind: train_one(kind, data, cfg, device, out) for kind in ("dlm", "ar")}
    result["config"] = asdict(cfg)
    (out / "train_log.json").write_text(json.dumps(result, indent=2))


def assemble(cfg: ZooConfig, trained: Path) -> None:
    """Write both checkpoint folders in their upstream formats, then evaluate into MODEL_CARD.md."""
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    from dlmscope.models.llada import save_llada

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(WORK / "tokenizer"))
    data = torch.load(WORK / "data.pt")
    for kind, name in (("dlm", "dlmscope-tiny-dlm"), ("ar", "dlmscope-tiny-ar")):
        module = tiny_llama(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_mlp=cfg.d_mlp,
                            vocab_size=cfg.vocab_size, seed=cfg.seed)
        module.load_state_dict(load_file(str(trained / f"{kind}.safetensors")))
        module.to(torch.bfloat16)
        module.config.pad_token_id = tokenizer.pad_token_id
        module.config.bos_token_id = tokenizer.bos_token_id
        module.config.eos_token_id = tokenizer.eos_token_id
        folder = ZOO / name
        if kind == "dlm":
            save_llada(module, folder, mask_id=data["mask_id"], tokenizer=tokenizer,
                       extra_config={"torch_dtype": "bfloat16"})
        else:
            module.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))
    write_card(cfg, data, json.loads((trained / "train_log.json").read_text()))


@torch.no_grad()
def evaluate_dlm(lm, heldout: torch.Tensor, n_rows: int = 256, seed: int = 0) -> dict:
    """Held-out masked-token CE per t bin and the ELBO (nats per token), same masks for every bin draw."""
    gen = torch.Generator().manual_seed(seed)
    x0 = heldout[:n_rows]
    per_bin = {}
    for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        ce, n = 0.0, 0
        for i in range(0, x0.shape[0], 64):
            xb = x0[i:i + 64]
            c = corrupt(xb, lm.mask_id, t, generator=gen)
            tok = token_ce(lm.denoise_logits(c.xt), xb)
            ce += float((tok * c.mask).sum())
            n += int(c.mask.sum())
        per_bin[f"{t:.1f}"] = ce / n
    elbo, count = 0.0, 0
    for i in range(0, x0.shape[0], 64):
        xb = x0[i:i + 64]
        c = corrupt(xb, lm.mask_id, sample_t(xb.shape[0], generator=gen), generator=gen)
        elbo += float(elbo_loss(lm.denoise_logits(c.xt), xb, c)) * xb.shape[0]
        count += xb.shape[0]
    return {"masked_ce_per_t": per_bin, "elbo_nats_per_token": elbo / count}


@torch.no_grad()
def evaluate_ar(lm, heldout: torch.Tensor, n_rows: int = 256) -> dict:
    x0 = heldout[:n_rows]
    ce = torch.cat([next_token_ce(lm.forward(x0[i:i + 64]), x0[i:i + 64]).flatten() for i in range(0, len(x0), 64)])
    return {"next_token_ce": float(ce.mean())}


def evaluate_sudoku(lm, n: int = 100, steps: int = 16) -> dict:
    """Exact-solve and cell accuracy of the DLM with the sampler on the Sudoku test split."""
    from dlmscope.diffusion.sampler import generate
    from dlmscope.tasks import get_task

    task = get_task("sudoku")
    examples = task.examples("test", n, seed=0)
    rewards, exact = [], []
    for i in range(0, n, 25):
        chunk = examples[i:i + 25]
        out = generate(lm, [ex.prompt for ex in chunk], gen_length=16, steps=steps, block_length=16)
        for ex, text in zip(chunk, out.texts):
            rewards.append(task.reward(ex, text))
            exact.append(task.is_correct(ex, text))
    return {"puzzles": n, "steps": steps, "exact_solve": sum(exact) / n, "cell_accuracy": sum(rewards) / n}


def write_card(cfg: ZooConfig, data: dict, log: dict) -> dict:
    from dlmscope.diffusion.sampler import generate
    from dlmscope.models import load_model

    dlm, ar = load_model("dlmscope-tiny-dlm"), load_model("dlmscope-tiny-ar")
    heldout = data["heldout"]
    torch.manual_seed(0)
    results = {"dlm": evaluate_dlm(dlm, heldout), "ar": evaluate_ar(ar, heldout), "sudoku": evaluate_sudoku(dlm)}
    prompts = ["The list type", "A dictionary is", "The import statement", "Exceptions are"]
    dlm_samples = generate(dlm, prompts, gen_length=32, steps=32, block_length=32).texts
    ar_samples = []
    for p in prompts:
        ids = torch.tensor([ar.to_tokens(p)[0]])
        for _ in range(32):
            ids = torch.cat([ids, ar.forward(ids)[:, -1:].argmax(-1)], 1)
        ar_samples.append(ar.to_text(ids[0, 1:]))
    results["samples"] = {"dlm": [p + s for p, s in zip(prompts, dlm_samples)], "ar": ar_samples}
    prep = json.loads((WORK / "prepare.json").read_text())
    bins = results["dlm"]["masked_ce_per_t"]
    lines = [
        "# Built-in twins: dlmscope-tiny-dlm and dlmscope-tiny-ar", "",
        "Rebuilt by `python experiments/train_zoo.py all` (seed 0). Numbers below are measured by that script.", "",
        "| | dlmscope-tiny-dlm | dlmscope-tiny-ar |", "|---|---|---|",
        "| architecture | LLaDA (Llama, bidirectional), LLaDA checkpoint format | Llama, causal, transformers format |",
        f"| parameters | {dlm.n_params():,} | {ar.n_params():,} |",
        f"| layers x d_model x heads, d_mlp | {cfg.n_layers} x {cfg.d_model} x {cfg.n_heads}, {cfg.d_mlp} | same |",
        f"| vocab (BPE, digits split) | {cfg.vocab_size} | same |",
        "| objective | masked-diffusion ELBO, t ~ U(0,1), eps 1e-3 | next-token CE |",
        f"| tokens seen | {log['dlm']['tokens_seen']:,} | {log['ar']['tokens_seen']:,} |",
        f"| training time ({log['dlm']['device']}) | {log['dlm']['seconds']:.0f} s | {log['ar']['seconds']:.0f} s |",
        f"| held-out loss | ELBO {results['dlm']['elbo_nats_per_token']:.3f} nats/token | next-token CE "
        f"{results['ar']['next_token_ce']:.3f} nats/token |", "",
        f"Data: the built-in corpus (Python reference prose + standard-library docstrings, {prep['train_docs']:,} train "
        f"documents, {prep['heldout_docs']:,} held out) mixed with {prep['task_docs']:,} Sudoku 4x4 and Countdown "
        f"training examples; packed into {cfg.context_length}-token rows ({prep['train_tokens']:,} train tokens, "
        f"{prep['heldout_tokens']:,} held-out tokens). Weights are stored in bfloat16.", "",
        "## DLM held-out masked-token CE per mask ratio t (nats)", "",
        "| t | " + " | ".join(bins) + " |", "|---" * (len(bins) + 1) + "|",
        "| CE | " + " | ".join(f"{v:.3f}" for v in bins.values()) + " |", "",
        f"## Sudoku 4x4 (test split, {results['sudoku']['puzzles']} puzzles, {results['sudoku']['steps']} steps, "
        "low-confidence remasking, temperature 0)", "",
        f"Exact solve {results['sudoku']['exact_solve']:.1%}, cell accuracy {results['sudoku']['cell_accuracy']:.1%}.", "",
        "## Samples (greedy)", "", "DLM (32 tokens, 32 steps, one block):", "",
        *[f"- {s!r}" for s in results["samples"]["dlm"]], "", "AR:", "",
        *[f"- {s!r}" for s in results["samples"]["ar"]], "",
    ]
    from dlmscope.io_utils import atomic_write_json, atomic_write_text

    atomic_write_text(ZOO / "MODEL_CARD.md", "\n".join(lines))
    atomic_write_json(ZOO / "model_card.json", results)
    print("\n".join(lines))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["prepare", "train", "assemble", "all"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", type=Path, default=WORK / "data.pt")
    parser.add_argument("--out", type=Path, default=WORK / "trained")
    parser.add_argument("--steps", type=int, default=None, help="override ZooConfig.steps (smoke runs)")
    args = parser.parse_args()
    cfg = ZooConfig()
    if args.steps is not None:
        cfg.steps = args.steps
    if args.stage in ("prepare", "all"):
        prepare(cfg)
    if args.stage in ("train", "all"):
        train(cfg, args.device, args.data, args.out)
    if args.stage in ("assemble", "all"):
        assemble(cfg, args.out)


if __name__ == "__main__":
    main()
