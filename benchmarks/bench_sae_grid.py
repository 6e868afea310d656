"""The SAE trainer grid: held-out FVU at equal tokens and tokens/s, dlmscope adam / signum_sf vs sparsify's default.

Cells: batch 1,024 and 4,096 x 299,008 and 999,424 tokens (292 / 976 steps at 1,024; 73 / 244 at 4,096), seeds 0-2
(the seed draws the SAE's initial weights; the batches and their order are the same for every seed), on two
activation sources, the last 16,384 vectors of each held out:

- `dlm`: the built-in DLM's layer-3 residual stream under the DLM-Scope masking protocol (`bench_sae_train.py`'s
  cache), d_in 256, 4,096 latents, k 32;
- `random128`: the same protocol on a random LLaDA-shaped model of width 128 (4 layers, the DLM's tokenizer), layer 3,
  d_in 128, 2,048 latents (the same 16x), k 16 (the same k / d_in).

Trainers: our `SAETrainer` with `--optimizer adam` and `signum_sf` (their defaults), and sparsify's SparseCoder
with its default optimiser (signum under a schedule-free wrapper, `bench_sae_train.Sparsify`). One process per
(source, batch, seed) steps every trainer on the same batches in turn; each trainer's steps are timed in this
process's CPU time (one thread), so tokens/s come from the run whose FVU is reported. Beside FVU each evaluation
records the share of latents that never fire (no positive top-k activation) on the held-out vectors: a dictionary
can buy FVU with fewer live latents, and this reads that for every trainer the same way.

Saving compute: an optimiser whose schedule does not depend on the run's length (signum_sf: warm-up only;
sparsify's: none) is trained once for 999,424 tokens and evaluated at 299,008 on the way. Adam decays over its last
20%, so it trains twice (a 299,008- and a 999,424-token run, side by side). The dead-latent window is the one other
setting that follows the length (total_tokens // 5 by default): the two one-run trainers get the 299,008-token run's
(59,801 tokens) so that their first checkpoint is exactly that run; the unit (dlm, 1,024, seed 0) also trains
signum_sf and sparsify as separate 299,008-token runs (`check`), which must reach the same FVU.

    python benchmarks/bench_sae_grid.py [--sources dlm,random128] [--seeds 0,1,2] [--batches 1024,4096]

Writes benchmarks/results/sae_grid.json after every evaluation; a rerun keeps what is there and trains only the
(source, batch, seed) runs, and in them only the trainers, with a result missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHORT, LONG = 300_000, 1_000_000
HELDOUT = 16_384
SOURCES = {"dlm": {"latents": 4096, "k": 32}, "random128": {"latents": 2048, "k": 16}}
TRAINERS = ("adam", "signum_sf", "sparsify")
CHECK_UNIT = ("dlm", 1024, 0)
"""The (source, batch, seed) that also trains signum_sf and sparsify as separate short runs (module docstring)."""


def activations(source: str, n: int) -> torch.Tensor:
    """(n, d) activations of a source, cached under .cache/bench/."""
    import bench_sae_train as bst  # a sibling script: its folder is on sys.path when this one runs

    if source == "dlm":
        return bst.cached_activations("dlm", n, "cpu")
    path = ROOT / ".cache" / "bench" / f"acts_{source}_{n}.pt"
    if not path.is_file():
        from dlmscope.io_utils import atomic_torch_save
        from dlmscope.models import load_model
        from dlmscope.models.tiny import write_tiny_llada

        folder = ROOT / ".cache" / "bench" / f"{source}-model"
        dlm = load_model("dlmscope-tiny-dlm")
        write_tiny_llada(folder, tokenizer=dlm.tokenizer, mask_id=dlm.mask_id, vocab_size=dlm.vocab_size, d_model=128,
                         n_layers=4, n_heads=4, d_mlp=512)
        atomic_torch_save(path, bst.dlm_activations(n, "cpu", model=str(folder)))
    return torch.load(path, weights_only=True)


class Ours:
    def __init__(self, optimizer: str, d: int, latents: int, k: int, total: int, batch: int, seed: int,
                 dead: int | None = None):
        from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig

        self.tr = SAETrainer(SAEConfig(d, latents, k), TrainConfig(total_tokens=total, batch_size=batch, seed=seed,
                                                                   optimizer=optimizer, dead_tokens=dead))

    def step(self, x: torch.Tensor) -> None:
        self.tr.step(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.tr.averaged():
            return self.tr.sae.reconstruct(x)

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self.tr.averaged():
            return self.tr.sae.encode_topk(x)


def sparsify(d: int, latents: int, k: int, total: int, batch: int, seed: int, dead: int):
    """sparsify's SparseCoder (its init draws from torch's global generator, seeded here) and default optimiser."""
    import bench_sae_train as bst

    torch.manual_seed(seed)
    return bst.Sparsify(d, latents, k, None, total, batch, dead, "cpu")


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def never_fired(runner, x: torch.Tensor, n_latents: int) -> float:
    """The share of latents with no positive activation among the top-k of any row of x (held out): latents that
    training left dead or so rare that they do not show on 16,384 vectors."""
    from dlmscope.sae.metrics import dead_fraction, fire_counts

    return dead_fraction(fire_counts(*runner.encode_topk(x), n_latents))


class Results:
    """A study's result file: the rows it holds already (a rerun trains only the missing ones), rewritten atomically
    by `save` with the machine, `fields(rows)` (the study's summaries) and the rows. This grid's, and the studies'
    that run on its data."""

    def __init__(self, path: str | Path, fields: Callable[[dict], dict]):
        self.path, self.fields = Path(path), fields
        self.rows: dict = json.loads(self.path.read_text())["rows"] if self.path.is_file() else {}

    def save(self) -> None:
        from dlmscope.io_utils import atomic_write_json

        atomic_write_json(self.path, {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                      "torch_threads": torch.get_num_threads(), "clock": "process CPU time",
                                      **self.fields(self.rows), "rows": self.rows})

    def fill(self, jobs: Iterable[tuple[str, Callable[[], dict]]], describe: Callable[[dict], str]) -> None:
        """Run each job whose key has no row yet, saving after each, so a killed study resumes at the next one."""
        for key, job in jobs:
            if key not in self.rows:
                self.rows[key] = row = job()
                print(f"{key}: {describe(row)}", flush=True)
                self.save()
        self.save()


def open_study(doc: str, out: str, summarise: Callable[[dict], list], **flags: str) -> tuple[argparse.Namespace,
                                                                                              torch.Tensor, Results]:
    """A study on this grid's data (the DLM's layer-3 activations, last HELDOUT held out): its command line (--seeds,
    --batches, `flags` as --name with their defaults, --out under benchmarks/results), one thread, the activations
    and its result file, whose summary is `summarise(rows)`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batches", default="1024,4096")
    for name, default in flags.items():
        p.add_argument(f"--{name}", default=default)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out))
    args = p.parse_args()
    torch.set_num_threads(1)
    results = Results(args.out, lambda rows: {"source": "dlm layer 3", "summary": summarise(rows)})
    return args, activations("dlm", LONG + HELDOUT), results


def ints(csv: str) -> list[int]:
    """"1024,4096" -> [1024, 4096]: a study's list flags."""
    return [int(v) for v in csv.split(",")]


def key(source: str, batch: int, seed: int, trainer: str, tokens: int) -> str:
    return f"{source}/{batch}/{seed}/{trainer}/{tokens}"


def plan(batch: int, check: bool) -> dict[str, tuple[str, int, list[int]]]:
    """Runner name -> (trainer, tokens it trains, token counts it is evaluated at)."""
    short, long = SHORT // batch * batch, LONG // batch * batch
    runners = {"adam short": ("adam", short, [short]), "adam": ("adam", long, [long]),
               "signum_sf": ("signum_sf", long, [short, long]), "sparsify": ("sparsify", long, [short, long])}
    if check:
        runners.update({"signum_sf check": ("signum_sf", short, [short]), "sparsify check": ("sparsify", short, [short])})
    return runners


def run_unit(source: str, batch: int, seed: int, x: torch.Tensor, rows: dict, save) -> None:
    """Train the runners of one (source, batch, seed) whose results are missing, interleaved; record as they finish."""
    cfg = SOURCES[source]
    train, held = x[:-HELDOUT], x[-HELDOUT:]
    d, short = x.shape[1], SHORT // batch * batch
    window = short // 5  # the short run's dead window, for the one-run trainers (module docstring)
    check = (source, batch, seed) == CHECK_UNIT
    todo = {name: spec for name, spec in plan(batch, check).items()
            if any(key(source, batch, seed, name, t) not in rows for t in spec[2])}
    if not todo:
        return
    runners = {}
    for name, (trainer, total, _) in todo.items():
        dead = window if total > short else None
        runners[name] = (sparsify(d, cfg["latents"], cfg["k"], total, batch, seed, dead or total // 5)
                         if trainer == "sparsify" else Ours(trainer, d, cfg["latents"], cfg["k"], total, batch, seed,
                                                            dead))
    cpu = dict.fromkeys(runners, 0.0)
    steps = max(spec[1] for spec in todo.values()) // batch
    print(f"{source}, batch {batch}, seed {seed}: {', '.join(runners)}", flush=True)
    for i in range(steps):
        b = train[i * batch:(i + 1) * batch]
        for name, r in runners.items():
            if (i + 1) * batch > todo[name][1]:
                continue
            t = time.process_time()
            r.step(b)
            cpu[name] += time.process_time() - t
            tokens = (i + 1) * batch
            if tokens in todo[name][2] and key(source, batch, seed, name, tokens) not in rows:
                value = fvu(held, r.reconstruct(held))
                rows[key(source, batch, seed, name, tokens)] = {
                    "source": source, "batch": batch, "seed": seed, "runner": name, "trainer": todo[name][0],
                    "tokens": tokens, "fvu": value, "tokens_per_s": tokens / cpu[name], "cpu_s": cpu[name],
                    "never_fired": never_fired(r, held, cfg["latents"]),
                    "dead_window": (window if todo[name][1] > short else None)}
                print(f"  {name} at {tokens} tokens: FVU {value:.4f}, {tokens / cpu[name]:,.0f} tok/s", flush=True)
                save()


def t_mean(values: list[float]) -> list[float]:
    from dlmscope.stats import t_interval

    return [float(v) for v in t_interval(values)]


def summarise(rows: dict) -> list[dict]:
    """Per (source, batch, tokens): each trainer's FVU and tokens/s as [mean, low, high] over seeds (Student-t), and
    paired over seeds: signum_sf - sparsify and adam - sparsify in FVU, signum_sf / sparsify and adam / sparsify in
    tokens/s."""
    cells = sorted({(r["source"], r["batch"], r["tokens"]) for r in rows.values()},
                   key=lambda c: (list(SOURCES).index(c[0]), c[1], c[2]))
    out = []
    for source, batch, tokens in cells:
        per = {t: {r["seed"]: r for r in rows.values() if (r["source"], r["batch"], r["tokens"], r["runner"])
                   == (source, batch, tokens, t if t != "adam" or tokens > SHORT else "adam short")}
               for t in TRAINERS}
        cell = {"source": source, "batch": batch, "tokens": tokens,
                "seeds": sorted(set.intersection(*(set(p) for p in per.values())))}
        for t in TRAINERS:
            seeds = sorted(per[t])
            cell[t] = {"seeds": seeds, **{m: t_mean([per[t][s][m] for s in seeds]) if seeds else None
                                          for m in ("fvu", "tokens_per_s", "never_fired")}}
        for t in ("adam", "signum_sf"):
            paired = cell["seeds"]
            cell[f"{t}_minus_sparsify_fvu"] = t_mean([per[t][s]["fvu"] - per["sparsify"][s]["fvu"]
                                                      for s in paired]) if paired else None
            cell[f"{t}_over_sparsify_speed"] = t_mean([per[t][s]["tokens_per_s"] / per["sparsify"][s]["tokens_per_s"]
                                                       for s in paired]) if paired else None
        out.append(cell)
    return out


def per_run(rows: dict) -> dict | None:
    """Over every (cell, seed): the smallest signum_sf / sparsify tokens/s ratio and the largest signum_sf - sparsify
    FVU difference, each with where it was."""
    pairs = [(r, rows[k.replace("/signum_sf/", "/sparsify/")]) for k, r in rows.items()
             if r["runner"] == "signum_sf" and k.replace("/signum_sf/", "/sparsify/") in rows]
    if not pairs:
        return None
    speed = min(pairs, key=lambda p: p[0]["tokens_per_s"] / p[1]["tokens_per_s"])
    fvu_gap = max(pairs, key=lambda p: p[0]["fvu"] - p[1]["fvu"])
    where = "{source}/{batch}/{tokens}/seed {seed}".format
    return {"runs": len(pairs),
            "min_signum_sf_over_sparsify_speed": speed[0]["tokens_per_s"] / speed[1]["tokens_per_s"],
            "at": where(**speed[0]), "max_signum_sf_minus_sparsify_fvu": fvu_gap[0]["fvu"] - fvu_gap[1]["fvu"],
            "fvu_at": where(**fvu_gap[0])}


def check(rows: dict) -> dict | None:
    """The one-run claim: FVU at the short count inside the long run vs the separate short run (`CHECK_UNIT`)."""
    got = {}
    source, batch, seed = CHECK_UNIT
    for t in ("signum_sf", "sparsify"):
        a, b = (rows.get(key(source, batch, seed, n, SHORT // batch * batch)) for n in (t, f"{t} check"))
        if a and b:
            got[t] = {"inside_long_run": a["fvu"], "short_run": b["fvu"], "difference": a["fvu"] - b["fvu"]}
    return got or None


def _fmt(v: list[float] | None, digits: int) -> str:
    """mean [low, high]; the mean alone where one seed gives no interval."""
    if v is None:
        return "-"
    return f"{v[0]:.{digits}f}" + ("" if v[1] == v[2] else f" [{v[1]:.{digits}f}, {v[2]:.{digits}f}]")


def readme_table(result: dict) -> str:
    """The README's grid table: per cell, mean [95% interval] over seeds (tokens/s: means)."""
    lines = ["| source | batch | tokens | seeds | held-out FVU: adam / signum_sf / sparsify | signum_sf - sparsify "
             "(paired) | tokens/s: adam / signum_sf / sparsify | signum_sf / sparsify speed | never fire on held-out: "
             "adam / signum_sf / sparsify |",
             "|---|---|---|---|---|---|---|---|---|"]

    def means(c: dict, metric: str, spec: str) -> str:
        return " / ".join("-" if c[t].get(metric) is None else format(c[t][metric][0], spec) for t in TRAINERS)

    for c in result["summary"]:
        fvus = " / ".join(_fmt(c[t]["fvu"], 4) for t in TRAINERS)
        lines.append(f"| {c['source']} | {c['batch']:,} | {c['tokens']:,} | {len(c['seeds'])} | {fvus} | "
                     f"{_fmt(c['signum_sf_minus_sparsify_fvu'], 4)} | {means(c, 'tokens_per_s', ',.0f')} | "
                     f"{_fmt(c['signum_sf_over_sparsify_speed'], 2)} | {means(c, 'never_fired', '.1%')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batches", default="1024,4096")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae_grid.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    started, cpu0 = time.time(), time.process_time()
    results = Results(args.out, lambda rows: {
        "heldout_tokens": HELDOUT, "sources": SOURCES, "load_average": os.getloadavg(), "check": check(rows),
        "per_run": per_run(rows), "summary": summarise(rows),
        "this_invocation": {"wall_s": time.time() - started, "cpu_s": time.process_time() - cpu0}})
    data = {}
    for seed in ints(args.seeds):
        for source in args.sources.split(","):
            if source not in data:
                data[source] = activations(source, LONG + HELDOUT)
            for batch in ints(args.batches):
                run_unit(source, batch, seed, data[source], results.rows, results.save)
    results.save()
    print(readme_table({"summary": summarise(results.rows)}))


if __name__ == "__main__":
    main()
