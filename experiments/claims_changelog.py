"""The old side of the README's changelog of claims, taken from the README's own git history.

Each entry names a commit and a sentence of the README as it stood there (the round's starting point unless
said otherwise); the script checks that the sentence was in that README and is no longer in today's (outside
the changelog), and records it with its numbers, so the changelog's old figures are bound to a file like every
other README number (`tests/test_provenance.py`) and cannot be misquoted. The new side of each entry is bound to the
study's own result file. Writes experiments/results/claims_changelog.json; needs the repository's git
history (a shallow clone may lack the commits).

    python experiments/claims_changelog.py
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402

ROUND_START = "dc3adae"  # the README before this round's changes (issue 25)
# name: (commit, a sentence of the README at that commit, whitespace-insensitive)
ENTRIES = {
    "steering": (ROUND_START, "all six concept-rate tests survive a Holm correction over the table's twelve "
                              "(largest adjusted p 0.021)"),
    "steering_early": (ROUND_START, "all-steps concept gain at a perplexity ratio of 1.57 instead of 8.00"),
    "prefix_cache": (ROUND_START, "solve 1.00 (+0.05 [+0.01, +0.09])"),
    "decoding_order": (ROUND_START, "Which differences are real (paired 95% interval of the difference to "
                                    "low_confidence excludes 0): pre-mask stability is higher for origin (+0.05 at "
                                    "L3), random (+0.03), topk_margin (+0.02) and maskgit_plus (+0.01)"),
    "exact_solve_interval": (ROUND_START, "| low_confidence | 0.78 [0.76, 0.81] | 0.61 [0.52, 0.71] | "
                                          "0.98 [0.95, 1.01] |"),
    "evaluate_range": (ROUND_START, "t = 0.5 (0.099-0.163 vs 0.499-0.535 across t = 0.1-0.9"),
    "probe": (ROUND_START, "the hidden digit of a masked Sudoku cell with accuracy 0.876 (visible cells 0.995); 5 SAE "
                           "latents reach 0.825."),
    "decoder_init_cosine": (ROUND_START, "the decoders keep about 0.78 cosine to their random init at this budget"),
    "pca_ratio": (ROUND_START, "the same FVU costs 3 to 4 times more than the SAE"),
    "countdown_gain": (ROUND_START, "its ELBO loss on them falls from 1.99 to 1.09"),
    "rl_reference": (ROUND_START, "No method differs from no RL at this budget (every interval contains 0); per seed, "
                                  "diffu-GRPO 0.420/0.425/0.375"),
    "attribution": ("085dc9b", "with a Spearman correlation of -0.242 between predicted and real effect over 8 graphs"),
}
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def squash(text: str) -> str:
    return " ".join(text.split())


def without_changelog(readme: str) -> str:
    """The README less its changelog section (which quotes the old claims)."""
    start = readme.find("<!-- section:changelog -->")
    end = readme.find("\n## ", start)
    return readme if start < 0 else readme[:start] + (readme[end:] if end >= 0 else "")


def run(args) -> dict:
    now = squash(without_changelog((ROOT / "README.md").read_text()))
    out = {}
    for name, (commit, quote) in ENTRIES.items():
        old = squash(subprocess.run(["git", "show", f"{commit}:README.md"], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout)
        if squash(quote) not in old:
            raise SystemExit(f"{name}: the quote is not in the README at {commit}")
        out[name] = {"commit": commit, "quote": squash(quote), "numbers": [float(x) for x in NUMBER.findall(quote)],
                     "still_in_readme": squash(quote) in now}
    return out


def render(res: dict, out: Path) -> str:
    stale = [k for k, v in res.items() if v["still_in_readme"]]
    return f"{len(res)} old claims quoted from the README's history" + (f"; still in today's README: {stale}"
                                                                         if stale else "")


def main() -> None:
    run_or_render(argparse.ArgumentParser(description=__doc__), "claims_changelog", run, render)


if __name__ == "__main__":
    main()
