"""This checkout's SAE trainer against an earlier revision's, side by side: step cost and whether the weights agree.

Speed changes of a few percent drown in this shared machine's drift between runs, so both trainers live in one
process: the base revision's `dlmscope` package is extracted (`git archive`, or copied from a directory) into a
temporary folder as `dlmscope_base`, and the two trainers, built with the same config and seed, step on the same
batches alternately (the order flips every step). Per step: the CPU-time ratio this / base, and whether every
parameter is still bit-for-bit equal. The data are `bench_sae_steps.py`'s (the built-in DLM's layer-3 activations,
d_in 256, 4,096 latents, k 32, `TrainConfig` defaults for the optimiser), so the ratio reads against its whole-run
figures. Reported over the whole run and per quarter: the median ratio with a 95% interval (order statistics), and
the first step, if any, at which the weights differ.

    python benchmarks/bench_sae_revision.py --base HEAD [--optimizer signum_sf] [--batch 4096] [--tokens 300000]

`--base` takes a git revision of this repository or a directory holding a `dlmscope` package. Writes
benchmarks/results/sae_revision.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
BASE_NAME = "dlmscope_base"


def extract_base(base: str, into: Path) -> ModuleType:
    """The base revision's `dlmscope.sae`, imported as `dlmscope_base.sae` from `into` (the package's imports are
    relative, so the copy uses its own modules throughout)."""
    target = into / BASE_NAME
    if Path(base).is_dir():
        shutil.copytree(Path(base) / "dlmscope", target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", base, "dlmscope"],
                                 capture_output=True, check=False)
        if archive.returncode:
            raise SystemExit(f"--base {base!r}: not a directory with a dlmscope package nor a git revision "
                             f"({archive.stderr.decode().strip()})")
        with tempfile.TemporaryFile() as f:
            f.write(archive.stdout)
            f.seek(0)
            with tarfile.open(fileobj=f) as tar:
                tar.extractall(into / "archive", filter="data")
        (into / "archive" / "dlmscope").rename(target)
    for name in [m for m in sys.modules if m == BASE_NAME or m.startswith(BASE_NAME + ".")]:
        del sys.modules[name]  # an earlier extraction in this process
    sys.path.insert(0, str(into))
    try:
        return importlib.import_module(f"{BASE_NAME}.sae")
    finally:
        sys.path.remove(str(into))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Bit-for-bit the same parameters under the same names (a renamed or added parameter counts as different)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)


def run(base_sae: ModuleType, x: torch.Tensor, batch: int, latents: int, k: int, optimizer: str) -> dict:
    """Both trainers over x in batches, paired step by step."""
    import dlmscope.sae as this_sae

    steps, d = x.shape[0] // batch, x.shape[1]
    trainers = {name: m.SAETrainer(m.SAEConfig(d, latents, k),
                                   m.TrainConfig(total_tokens=steps * batch, batch_size=batch, optimizer=optimizer))
                for name, m in (("base", base_sae), ("this", this_sae))}
    ratios, first_difference = [], None
    for i in range(steps):
        b = x[i * batch:(i + 1) * batch]
        took = {}
        for name in (("base", "this") if i % 2 == 0 else ("this", "base")):
            t = time.process_time()
            trainers[name].step(b)
            took[name] = time.process_time() - t
        ratios.append(took["this"] / took["base"])
        if first_difference is None and not same_weights(trainers["this"].sae, trainers["base"].sae):
            first_difference = i
    return {"steps": steps, "ratios": ratios, "first_difference": first_difference}


def report(ratios: list[float]) -> dict:
    """Median ratio this / base [95% interval] over the whole run and per quarter."""
    import bench_sae_steps as steps  # a sibling script: its folder is on sys.path when this one runs

    return {label: steps.summary(rs) for label, rs in steps.run_parts(ratios).items() if rs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision, or a directory holding a dlmscope package")
    p.add_argument("--optimizer", default="signum_sf")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae_revision.json"))
    args = p.parse_args()
    from dlmscope.io_utils import atomic_write_json

    torch.set_num_threads(args.threads)
    import bench_sae_train

    x = bench_sae_train.cached_activations("dlm", args.tokens + 16_384, "cpu")[:args.tokens]
    with tempfile.TemporaryDirectory() as tmp:
        base_sae = extract_base(args.base, Path(tmp))
        t0, c0 = time.time(), time.process_time()
        r = run(base_sae, x, args.batch, args.latents, args.k, args.optimizer)
    git = ["git", "-C", str(ROOT)]
    revision = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--porcelain", "--", "dlmscope"], capture_output=True, text=True).stdout
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "clock": "process CPU time", "source": "dlm layer 3",
              "base": args.base, "this": revision + (" with uncommitted changes to dlmscope/" if changed.strip() else ""),
              "optimizer": args.optimizer,
              "d_in": x.shape[1], "latents": args.latents, "k": args.k, "batch": args.batch,
              "tokens": r["steps"] * args.batch, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
              "bit_identical": r["first_difference"] is None, "first_difference": r["first_difference"],
              "summary": report(r["ratios"]), "ratios": r["ratios"]}
    for label, s in result["summary"].items():
        print(f"{label}: this / base {s['median']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] over {s['n']} steps")
    print("weights bit-identical at every step" if result["bit_identical"]
          else f"weights differ from step {r['first_difference']}")
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
