"""What every study script shares: the output flags, and running the study or re-rendering its saved JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from dlmscope.io_utils import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def run_or_render(p: argparse.ArgumentParser, name: str, run: Callable, render: Callable) -> None:
    """Parse the arguments, run the study (or reload `<out>/<name>.json` with --render) and print its table."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--render", action="store_true", help="only rebuild table and figure from the JSON")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        results = json.loads((args.out / f"{name}.json").read_text())
    else:
        results = run(args)
        atomic_write_json(args.out / f"{name}.json", results)
    print(render(results, args.out))
