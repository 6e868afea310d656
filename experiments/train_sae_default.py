"""Re-measure `dlmscope train-sae` with its defaults (the README's train-sae figures).

Runs the real CLI in a child process (`--threads 1`, the README's advice on a shared CPU; a fresh run
folder under a temporary directory) and records wall time, the child's CPU time and peak RSS, the
machine's load average, and the held-out FVU, cosine, L0 and dead fraction of both SAEs from the run's
metrics.json. Wall time depends on what else the CPU runs; CPU time and peak RSS much less so.
Writes experiments/results/train_sae_default.json; `--batch-size N` runs the same default with another batch
size (the batch ablation) into train_sae_default_bN.json. `train_sae_default_adam.json` (and `_b4096.json`) are
runs from before signum_sf became the Top-K default, when `adam` was.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()
        t0 = time.time()
        batch = ["--batch-size", str(args.batch_size)] if args.batch_size else []
        subprocess.run([sys.executable, "-m", "dlmscope", "train-sae", "--threads", "1", "--out", tmp,
                        "--name", "default", "--no-progress", *batch], check=True, cwd=ROOT)
        wall = time.time() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        metrics = json.loads((Path(tmp) / "default" / "metrics.json").read_text())
        config = json.loads((Path(tmp) / "default" / "config.json").read_text())
    saes = {key: {m: v for m, v in final.items() if m in ("fvu", "cosine", "l0", "dead_fraction")}
            for key, final in metrics["final"].items()}
    return {"config": config, "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "load_average_at_start": [round(x, 2) for x in load],
            "saes": saes}


def render(res: dict, out: Path) -> str:
    lines = ["| SAE | held-out FVU | cosine | L0 | dead |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {m['fvu']:.3f} | {m['cosine']:.3f} | {m['l0']:.1f} | {100 * m['dead_fraction']:.1f}% |"
              for k, m in res["saes"].items()]
    return (f"wall {res['wall_s']} s (load average {res['load_average_at_start'][0]} at start), "
            f"CPU {res['cpu_s']} s, peak RSS {res['peak_rss_gib']} GiB\n\n" + "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-size", type=int, default=0, help="another batch size than train-sae's default")
    batch = p.parse_known_args()[0].batch_size
    run_or_render(p, "train_sae_default" + (f"_b{batch}" if batch else ""), run, render)


if __name__ == "__main__":
    main()
