"""Train the shipped transcoders: one skip transcoder per layer of the built-in DLM and of its AR twin.

Each reads `blocks.{i}.hook_mlp_in` (the normalised residual the MLP reads) and predicts
`blocks.{i}.hook_mlp_out`, for every layer, with the real `dlmscope train-sae` CLI in a child process
(`--threads 1`). The text is the built-in corpus mixed with Sudoku 4x4 train-split puzzles and their
solutions (the built-in models were trained on both; the attribution study reads Sudoku), written to a
temporary jsonl. The DLM's transcoders see every position of a corrupted row (`--policy all`, t ~ U[0.05,
0.95]): an attribution graph needs features at visible and masked positions alike; the AR twin's see clean
text. The trained folders are copied to dlmscope/saes/tiny-{dlm,ar}-tc-L{i}; held-out metrics from the run
go to experiments/results/train_transcoders.json. The shipped DLM transcoders were trained with the defaults
(400k tokens); the AR twin's with `--models ar --total-tokens 150000` (a CPU shared with other work).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402

SAES = ROOT / "dlmscope" / "saes"
MODELS = {"dlm": ("dlmscope-tiny-dlm", ["--policy", "all", "--t-min", "0.05", "--t-max", "0.95"]),
          "ar": ("dlmscope-tiny-ar", [])}


def write_text(path: Path, n_sudoku: int, seed: int = 0) -> dict:
    """Built-in train corpus + Sudoku train docs, shuffled; the last 5% (train-sae's held-out cut) likewise mixed."""
    from dlmscope.data import builtin_corpus
    from dlmscope.tasks import get_task

    prose = builtin_corpus("train")
    sudoku = [ex.prompt + ex.answer for ex in get_task("sudoku").examples("pretrain", n_sudoku, seed=seed)]
    docs = prose + sudoku
    random.Random(seed).shuffle(docs)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"prose_docs": len(prose), "sudoku_docs": len(sudoku)}


def record(kind: str, run_folder: Path, wall_s: float | None, cpu_s: float | None, args) -> dict:
    """Copy a finished train-sae run's transcoders into dlmscope/saes/ and return their held-out metrics."""
    metrics = json.loads((run_folder / "metrics.json").read_text())["final"]
    layers = {}
    for key, m in metrics.items():
        name = f"tiny-{kind}-tc-L{int(key.split('.')[1])}"
        dest = SAES / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(run_folder / "saes" / key.replace(".", "_"), dest)
        layers[name] = {m_: m[m_] for m_ in ("fvu", "cosine", "l0", "dead_fraction")}
    config = json.loads((run_folder / "config.json").read_text())
    return {"model": MODELS[kind][0], "wall_s": wall_s, "cpu_s": cpu_s,
            "config": {k: config[k] for k in ("layers", "k", "expansion", "total_tokens", "policy", "t_min", "t_max")},
            "n_sudoku": args.n_sudoku, "transcoders": dict(sorted(layers.items()))}


def run(args) -> dict:
    """Train (or, with --from-run, record) each model's transcoders; other models' entries of an earlier result
    are kept, so the DLM and the AR twin can be trained in separate runs."""
    path = args.out / "train_transcoders.json"
    out = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "text.jsonl"
        out["data"] = write_text(data, args.n_sudoku)
        for kind in args.models.split(","):
            if args.from_run:
                folder = Path(args.from_run)
                wall = json.loads((folder / "metrics.json").read_text())["seconds"]
                out["models"][kind] = record(kind, folder, round(wall, 1), None, args)
                continue
            model, extra = MODELS[kind]
            t0 = time.time()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, "-m", "dlmscope", "train-sae", "--model", model, "--layers", args.layers,
                            "--site", "mlp_in", "--target-site", "mlp_out", "--architecture", "skip_transcoder",
                            "--k", str(args.k), "--expansion", str(args.expansion), "--total-tokens",
                            str(args.total_tokens), "--dataset", str(data), "--threads", "1", "--out", tmp,
                            "--name", kind, "--no-progress", *extra], check=True, cwd=ROOT)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            out["models"][kind] = record(kind, Path(tmp) / kind, round(time.time() - t0, 1), round(cpu, 1), args)
            print(kind, json.dumps(out["models"][kind], indent=1), flush=True)
    return out


def render(res: dict, out: Path) -> str:
    return readme_table(res)


def readme_table(res: dict) -> str:
    lines = ["| transcoder | held-out FVU of mlp_out | cosine | L0 | dead |", "|---|---|---|---|---|"]
    for m in res["models"].values():
        lines += [f"| {k} | {v['fvu']:.3f} | {v['cosine']:.3f} | {v['l0']:.1f} | {100 * v['dead_fraction']:.1f}% |"
                  for k, v in m["transcoders"].items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="dlm,ar")
    p.add_argument("--layers", default="0,1,2,3,4,5")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--total-tokens", type=int, default=400_000)
    p.add_argument("--n-sudoku", type=int, default=3000)
    p.add_argument("--from-run", default="", help="record a finished train-sae run folder (of the one model in "
                   "--models) instead of training")
    run_or_render(p, "train_transcoders", run, render)


if __name__ == "__main__":
    main()
