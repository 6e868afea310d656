"""The built-in corpus's size and build time, for the README's data section.

Builds the corpus in a fresh cache folder (so the build is timed, not the cache read), and the Debian-docs
variant when python3.11-doc is installed (recorded as absent otherwise). Writes
experiments/results/corpus_stats.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402


def run(args) -> dict:
    from dlmscope import data

    with tempfile.TemporaryDirectory() as cache:
        os.environ["DLMSCOPE_CACHE"] = cache
        t0 = time.perf_counter()
        stats = data.corpus_stats()
        build_s = time.perf_counter() - t0
        debian = data.corpus_stats(debian_docs=True) if data.DEBIAN_DOCS.is_dir() else None
    total = {"documents": sum(s["documents"] for s in stats.values()),
             "characters": sum(s["characters"] for s in stats.values())}
    return {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "builtin": stats | {"total": total},
            "build_s": build_s, "debian_docs": debian}


def render(res: dict, out: Path) -> str:
    b = res["builtin"]
    return (f"Python {res['python']}: {b['train']['documents']:,} train and {b['heldout']['documents']:,} held-out "
            f"paragraphs, {b['total']['characters'] / 1e6:.1f}M characters, built in {res['build_s']:.1f} s; "
            f"Debian docs: {'not installed' if res['debian_docs'] is None else res['debian_docs']}")


def main() -> None:
    run_or_render(argparse.ArgumentParser(description=__doc__), "corpus_stats", run, render)


if __name__ == "__main__":
    main()
