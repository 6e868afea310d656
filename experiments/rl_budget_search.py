"""Budget search for the RL comparison, on the VALIDATION split (never the test puzzles).

Each `--try` is one RL run (seed 0 unless it sets `seed`) from `rl_compare.py`'s base settings with the given
`RLConfig` fields changed, evaluated greedily on `--eval-n` validation puzzles (solution grids disjoint from
train and test) every `eval_every` steps. Every setting tried is kept in the result file with its validation
scores, rollout-reward curve and mean log-ratio to the reference, so the search that chose `rl_compare.py`'s
defaults is on record. A finished setting is not rerun; the file is rebuilt from every finished run folder after each try:

    python experiments/rl_budget_search.py --try algo=diffu-grpo,lr=3e-4,rl_steps=40 --try algo=rspo,lr=3e-4
    python experiments/rl_budget_search.py            # only rebuild the file from the finished run folders
    python experiments/rl_budget_search.py --countdown  # and measure the starting model on Countdown validation

Writes experiments/results/rl_budget_search.{json,md}; run folders in runs/rl-search/<setting>/.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import RESULTS  # noqa: E402
from dlmscope.io_utils import atomic_write_json, atomic_write_text  # noqa: E402


def parse_try(text: str) -> dict:
    """`key=value,...` -> RLConfig fields with their types (a bad key is one line)."""
    from dlmscope.errors import DLMScopeError
    from dlmscope.rl import RLConfig

    types = {f.name: type(f.default) for f in fields(RLConfig)}
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise DLMScopeError(f"--try key {key!r} is not an RLConfig field")
        kind = types[key]
        out[key] = value.lower() in ("1", "true") if kind is bool else kind(value) if kind in (int, float, str) else value
    return out


SEARCH_ONLY = ("eval_split", "out", "eval_every", "checkpoint_every", "eval_n", "resume")


def setting_name(changes: dict) -> str:
    """The canonical `key=value,...` of a setting (RLConfig field order), its key in the result file."""
    from dlmscope.rl import RLConfig

    order = [f.name for f in fields(RLConfig)]
    return ",".join(f"{k}={changes[k]}" for k in sorted(changes, key=order.index))


def run_one(changes: dict, base, runs: Path) -> Path:
    """Train one setting into runs/<setting>/ (a finished folder is kept as it is)."""
    from dlmscope.rl import train_rl

    folder = runs / setting_name(changes).replace("=", "").replace(",", "_")
    if not _finished(folder):
        cfg = replace(base, eval_split="validation", out=str(folder), resume=(folder / "log.json").is_file(), **changes)
        train_rl(replace(cfg, eval_every=changes.get("eval_every", max(1, cfg.rl_steps // 4)),
                         checkpoint_every=cfg.rl_steps))
    return folder


def _finished(folder: Path) -> bool:
    return (folder / "log.json").is_file() and "after" in json.loads((folder / "log.json").read_text())


def summarise(log: dict, base) -> dict:
    """A finished run's validation scores, rollout-reward curve and drift from the reference."""
    import numpy as np

    defaults = {k: v for k, v in vars(base).items() if k not in SEARCH_ONLY}
    changes = {k: v for k, v in log["config"].items() if k in defaults and (v != defaults[k] or k == "algo")}
    steps = log["steps"]
    ratio = [s["log_ratio"] for s in steps if "log_ratio" in s]
    q = max(1, len(steps) // 4)
    return {"changes": changes, "config": log["config"],
            "validation": [{k: e[k] for k in ("step", "accuracy", "reward")} for e in log["eval"]],
            "before": {k: log["before"][k] for k in ("accuracy", "reward")},
            "after": {k: log["after"][k] for k in ("accuracy", "reward")},
            "rollout_reward": [s["reward"] for s in steps],
            "rollout_reward_first_last_quarter": [float(np.mean([s["reward"] for s in steps[:q]])),
                                                  float(np.mean([s["reward"] for s in steps[-q:]]))],
            "mean_abs_log_ratio": float(np.mean(np.abs(ratio))) if ratio else None,
            "sample_s": float(np.mean([s["sample_s"] for s in steps])),
            "update_s": float(np.mean([s["update_s"] for s in steps]))}


def collect(runs: Path, base) -> dict:
    """Every finished run under `runs`, in the order they finished (the file is rebuilt from the folders, so
    an interrupted or concurrent search loses nothing)."""
    logs = sorted((f / "log.json" for f in runs.iterdir() if _finished(f)), key=lambda p: p.stat().st_mtime)
    tries = {}
    for path in logs:
        r = summarise(json.loads(path.read_text()), base)
        tries[setting_name(r["changes"])] = r
    return tries


def countdown_start(base, n: int = 100, steps: int = 16) -> dict:
    """Whether Countdown could be the RL task: the starting model's greedy score on validation problems."""
    from dlmscope.models import load_model
    from dlmscope.rl.rollout import evaluate
    from dlmscope.tasks import get_task

    task = get_task("countdown")
    r = evaluate(load_model(base.model), task, task.examples("validation", n, seed=0), gen_length=base.gen_length,
                 steps=steps)
    return {"problems": n, "steps": steps, "solved": sum(r["correct"]), "accuracy": r["accuracy"],
            "reward": r["reward"]}


def render(res: dict, out: Path) -> str:
    lines = ["| setting | validation exact: before -> after (best step) | validation cell acc: before -> after | "
             "rollout reward: first -> last quarter | mean abs log-ratio |", "|---|---|---|---|---|"]
    for name, r in res["tries"].items():
        best = max(r["validation"], key=lambda e: e["reward"])
        ratio = "-" if r["mean_abs_log_ratio"] is None else f"{r['mean_abs_log_ratio']:.3g}"
        q = r["rollout_reward_first_last_quarter"]
        lines.append(f"| {name} | {r['before']['accuracy']:.3f} -> {r['after']['accuracy']:.3f} | "
                     f"{r['before']['reward']:.3f} -> {r['after']['reward']:.3f} (best {best['reward']:.3f} at step "
                     f"{best['step']}) | {q[0]:.3f} -> {q[1]:.3f} | {ratio} |")
    md = ("RL budget search on the validation split (seed 0 unless set; settings are changes to the first committed "
          "comparison: rspo, 30 steps x 4 prompts x 6 completions, lr 3e-05, full fine-tune, 2-step decoding; "
          f"{res['eval_n']} validation puzzles, greedy). In the order tried.\n\n" + "\n".join(lines) + "\n")
    if "countdown" in res:
        c = res["countdown"]
        md += (f"\nCountdown, starting model, greedy at {c['steps']} steps: {c['solved']} of {c['problems']} validation "
               f"problems solved, mean reward {c['reward']:.3f} (0.1 = well-formed but wrong).\n")
    atomic_write_text(out / "rl_budget_search.md", md)
    return md


def main() -> None:
    from rl_compare import base_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--try", dest="tries", action="append", default=[], help="key=value,... RLConfig changes")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "rl-search")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--render", action="store_true", help="only rebuild the table from the JSON")
    p.add_argument("--countdown", action="store_true", help="also measure the starting model on Countdown validation")
    args = p.parse_args()
    base = replace(base_config(steps=30, prompts=4, lr=3e-5, lora_r=0), eval_n=args.eval_n)  # the first committed run
    path = args.out / "rl_budget_search.json"
    if not args.render:
        res = json.loads(path.read_text()) if path.is_file() else {}
        if args.countdown:
            res["countdown"] = countdown_start(base)
        for text in args.tries:
            run_one(parse_try(text), base, args.runs)
            atomic_write_json(path, {**res, "eval_n": args.eval_n, "tries": collect(args.runs, base)})
        atomic_write_json(path, {**res, "eval_n": args.eval_n, "tries": collect(args.runs, base)})
    print(render(json.loads(path.read_text()), args.out))


if __name__ == "__main__":
    main()
