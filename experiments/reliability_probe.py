"""Issue 22's bad inputs, run again the way a user meets them: each case is the installed `dlmscope` command in a
fresh folder (the feature-store cases use `FeatureStore.open`, what the explorer and the API call; there is no
command that only opens a store). A case passes when it ends as the issue asks: exit code 2 with exactly one
line ("error: ...") and nothing else printed, or, for the data-loss and repair cases, the user's files kept
byte for byte and the damaged checkpoint rewritten. Writes experiments/results/reliability_probe.json;
`--render` rebuilds the table from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402

T = ["--total-tokens", "4096", "--threads", "1", "--buffer-tokens", "2048", "--batch-size", "256", "--eval-tokens",
     "512", "--expansion", "2", "--no-progress"]
CATEGORIES = {1: "non-finite values", 2: "negative / huge counts", 3: "feature stores read unverified",
              4: "data loss", 5: "tracebacks instead of one line", 6: "out-of-range values accepted",
              7: "noise before errors"}


def dlmscope(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dlmscope", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)


def one_line(done: subprocess.CompletedProcess) -> dict:
    """Exit 2, one `error:` line on stderr and nothing on stdout."""
    err = [line for line in done.stderr.splitlines() if line.strip()]
    ok = done.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and not done.stdout.strip()
    return {"ok": ok, "exit": done.returncode, "stderr": err[-3:], "stdout": done.stdout.strip().splitlines()[-2:]}


def api_one_line(fn) -> dict:
    from dlmscope.errors import DLMScopeError

    try:
        fn()
    except DLMScopeError as e:
        return {"ok": len(str(e).splitlines()) == 1, "exit": 2, "stderr": [str(e)]}
    except Exception as e:  # noqa: BLE001 - a traceback is what the probe counts
        return {"ok": False, "exit": 1, "stderr": [f"{type(e).__name__}: {e}"]}
    return {"ok": False, "exit": 0, "stderr": []}


# ----------------------------------------------------------------------------------------------- fixtures

def tiny_folders(root: Path) -> dict[str, Path]:
    from dlmscope.models.tiny import write_tiny_causal, write_tiny_llada, write_tiny_lladamoe
    from dlmscope.models.zoo import builtin_path
    from dlmscope.models.checkpoint import load_tokenizer

    tok = load_tokenizer(builtin_path("dlmscope-tiny-dlm"))
    kw = dict(vocab_size=len(tok), tokenizer=tok)
    return {"llada": write_tiny_llada(root / "llada", mask_id=tok.mask_token_id, **kw),
            "causal": write_tiny_causal(root / "causal", **kw), "moe": write_tiny_lladamoe(root / "moe")}


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def nan_cache(cwd: Path, value: float = float("nan")) -> Path:
    """A small cache whose shard 1 holds `value` with a re-recorded (valid) checksum."""
    from safetensors.torch import load_file, save_file

    from dlmscope.io_utils import file_sha256

    dlmscope(["cache", "--out", "cache", "--layers", "1", "--batches", "4", "--seqs-per-forward", "2", "--context-length", "64",
              "--policy", "all"], cwd)
    folder = cwd / "cache"
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = folder / manifest["shards"][1]["file"]
    tensors = load_file(str(shard))
    tensors["act.blocks.1.hook_resid_post"][::3] = value
    save_file(tensors, str(shard))
    manifest["shards"][1]["sha256"] = file_sha256(shard)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# -------------------------------------------------------------------------------------------------- cases

def case_nan_resume(cwd: Path) -> dict:
    from dlmscope.runstate import load_state, save_state

    dlmscope(["cache", "--out", "cache", "--layers", "1", "--batches", "4", "--seqs-per-forward", "2", "--context-length", "64",
              "--policy", "all"], cwd)
    run = ["train-sae", "--activation-cache", "cache", "--layers", "1", "--k", "8", *T, "--total-tokens", "512", "--name", "r"]
    dlmscope(run, cwd)
    state = load_state(cwd / "runs" / "r", "checkpoint")
    key = next(iter(state["trainers"]))
    state["trainers"][key]["sae"]["W_dec"][0, 0] = float("nan")
    save_state(cwd / "runs" / "r", "checkpoint", state)
    return one_line(dlmscope([*run, "--resume"], cwd))


def store_case(cwd: Path, damage) -> dict:
    from dlmscope.analysis.features import FeatureStore

    dlmscope(["features", "build", "--sae", "tiny-dlm-L3-k32", "--out", "store", "--n-seqs", "8"], cwd)
    folder = cwd / "store"
    damage(folder, json.loads((folder / "manifest.json").read_text()))
    return api_one_line(lambda: FeatureStore.open(folder))


def flip_bit(folder: Path, manifest: dict) -> None:
    path = folder / manifest["arrays"]["file"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def edit_array(name: str, value: float):
    def damage(folder: Path, manifest: dict) -> None:
        from safetensors.torch import load_file, save_file

        path = folder / manifest["arrays"]["file"]
        arrays = {k: v.clone() for k, v in load_file(str(path)).items()}
        arrays[name][5] = value
        save_file(arrays, str(path))
    return damage


def short_vocab(folder: Path, manifest: dict) -> None:
    edit_json(folder / "manifest.json", vocab=manifest["vocab"][:100])


def case_store_rebuild(cwd: Path) -> dict:
    build = ["features", "build", "--sae", "tiny-dlm-L3-k32", "--out", "store", "--context-length", "32"]
    dlmscope([*build, "--n-seqs", "4"], cwd)
    mine = {"mynotes.txt": b"my notes", "store.pt": b"my tensors"}
    for name, data in mine.items():
        (cwd / "store" / name).write_bytes(data)
    done = dlmscope([*build, "--n-seqs", "6"], cwd)
    kept = {name: (cwd / "store" / name).read_bytes() for name in mine} == mine
    return {"ok": done.returncode == 0 and kept, "exit": done.returncode, "stderr": done.stderr.splitlines()[-2:],
            "kept": kept}


def case_splice_out(cwd: Path) -> dict:
    (cwd / "notes.txt").write_text("my notes")
    r = one_line(dlmscope(["eval-splice", "--sae", "tiny-dlm-L1-k32", "--n-seqs", "2", "--out", "notes.txt"], cwd))
    r["kept"] = (cwd / "notes.txt").read_text() == "my notes"
    r["ok"] = r["ok"] and r["kept"]
    return r


def case_small_cache(cwd: Path) -> dict:
    dlmscope(["cache", "--out", "small", "--layers", "1", "--batches", "2", "--seqs-per-forward", "1", "--context-length", "120",
              "--policy", "all"], cwd)
    return one_line(dlmscope(["train-sae", "--activation-cache", "small", "--layers", "1", "--batch-size", "256", "--eval-tokens",
                              "256", "--total-tokens", "1024", "--buffer-tokens", "512", "--no-progress"], cwd))


def case_pickled(cwd: Path, folders: dict) -> dict:
    import shutil

    import torch

    folder = Path(shutil.copytree(folders["causal"], cwd / "pickled"))
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    return one_line(dlmscope(["generate", "--model", str(folder)], cwd))


def copy_with(folders: dict, family: str, to: Path, **config) -> Path:
    import shutil

    folder = Path(shutil.copytree(folders[family], to))
    edit_json(folder / "config.json", **config)
    return folder


def case_nan_weights(cwd: Path, folders: dict) -> dict:
    import shutil

    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(folders["llada"], cwd / "nan"))
    weights = load_file(str(folder / "model.safetensors"))
    key = sorted(weights)[0]
    weights[key].view(-1)[7] = float("nan")
    save_file(weights, str(folder / "model.safetensors"))
    return one_line(dlmscope(["generate", "--model", str(folder), "--gen-length", "8", "--steps", "8"], cwd))


def case_long_prompt(cwd: Path) -> dict:
    from dlmscope.models.tiny import write_tiny_llada2
    from dlmscope.models.zoo import builtin_path
    from dlmscope.models.checkpoint import load_tokenizer

    tok = load_tokenizer(builtin_path("dlmscope-tiny-dlm"))
    folder = write_tiny_llada2(cwd / "l2", vocab_size=len(tok), tokenizer=tok, mask_id=tok.mask_token_id)
    edit_json(folder / "config.json", max_position_embeddings=4096)
    return one_line(dlmscope(["generate-blocks", "--model", str(folder), "-p", "the list type " * 3000, "--max-new-tokens", "4"],
                             cwd))


def case_policy_list(cwd: Path) -> dict:
    r = one_line(dlmscope(["train-sae", "--policy", "bad"], cwd))
    r["ok"] = r["ok"] and "allowed: , " not in r["stderr"][0]
    return r


def case_truncated_rl_checkpoint(cwd: Path) -> dict:
    rl = ["rspo", "--task", "sudoku", "--group-size", "2", "--prompts-per-step", "1", "--eval-n", "1", "--gen-length",
          "8", "--denoise-steps", "4", "--out", "rl"]
    dlmscope([*rl, "--rl-steps", "1"], cwd)
    weights = cwd / "rl" / "checkpoint-00001" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    done = dlmscope([*rl, "--rl-steps", "2", "--resume"], cwd)
    repaired = weights.read_bytes() == good and "repaired" in done.stderr
    return {"ok": done.returncode == 0 and repaired, "exit": done.returncode, "repaired": repaired,
            "stderr": [line for line in done.stderr.splitlines() if "repaired" in line or "error" in line][-2:]}


def cases(folders: dict) -> list[tuple[int, str, object]]:
    """(category, case, how to run it in a fresh folder): the issue's list in its order."""
    def cli(*argv):
        return lambda cwd: one_line(dlmscope(list(argv), cwd))

    bin_file = "binary.txt"
    return [
        (1, "train-sae --architecture jumprelu --l0-coef nan", cli("train-sae", *T, "--architecture", "jumprelu",
                                                                   "--l0-coef", "nan")),
        (1, "cache shard holding NaN, valid checksum", lambda cwd: one_line(dlmscope(
            ["train-sae", "--activation-cache", str(nan_cache(cwd)), "--layers", "1", "--k", "8", *T, "--total-tokens", "512"],
            cwd))),
        (1, "resume state holding NaN, valid checksums", case_nan_resume),
        (1, "diff --lr nan", cli("diff", "--checkpoints", "dlmscope-tiny-dlm,dlmscope-tiny-dlm", "--lr", "nan")),
        (2, "features build --n-seqs -4", cli("features", "build", "--n-seqs", "-4")),
        (2, "diff --n-seqs -1", cli("diff", "--checkpoints", "dlmscope-tiny-dlm,dlmscope-tiny-dlm", "--n-seqs", "-1")),
        (2, "diff --n-examples -1", cli("diff", "--checkpoints", "dlmscope-tiny-dlm,dlmscope-tiny-dlm", "--n-examples",
                                        "-1")),
        (2, "train-sae --total-tokens 1e23", cli("train-sae", "--total-tokens", "1e23")),
        (2, "train-sae --total-tokens 10^23", cli("train-sae", "--total-tokens", str(10**23))),
        (3, "store: a flipped bit", lambda cwd: store_case(cwd, flip_bit)),
        (3, "store: NaN in values", lambda cwd: store_case(cwd, edit_array("values", float("nan")))),
        (3, "store: feature_offsets[5] = 1e9", lambda cwd: store_case(cwd, edit_array("feature_offsets", 10**9))),
        (3, "store: shortened vocab", lambda cwd: store_case(cwd, short_vocab)),
        (4, "features build --out STORE keeps mynotes.txt, store.pt", case_store_rebuild),
        (4, "eval-splice --out notes.txt (existing)", case_splice_out),
        (5, "train-sae --bandwidth 0", cli("train-sae", "--architecture", "jumprelu", "--bandwidth", "0")),
        (5, "train-sae --dataset <binary file>", lambda cwd: (cwd / bin_file).write_bytes(os.urandom(4096))
         and one_line(dlmscope(["train-sae", "--dataset", bin_file, *T], cwd))),
        (5, "cache --dataset <binary file>", lambda cwd: (cwd / bin_file).write_bytes(os.urandom(4096))
         and one_line(dlmscope(["cache", "--out", "c", "--dataset", bin_file], cwd))),
        (5, "generate --seed 10^23", cli("generate", "--seed", str(10**23))),
        (5, "evaluate --out <a file>", lambda cwd: (cwd / "f").write_text("x")
         and one_line(dlmscope(["evaluate", "--sae", "tiny-dlm-L1-k32", "--out", "f"], cwd))),
        (5, "evaluate --out <unwritable>", cli("evaluate", "--sae", "tiny-dlm-L1-k32", "--out", "/proc/dlmscope/eval")),
        (5, "experts --out <a file>", lambda cwd: (cwd / "f").write_text("x")
         and one_line(dlmscope(["experts", "--model", str(folders["moe"]), "--out", "f"], cwd))),
        (5, "240-token cache, --batch-size 256 --eval-tokens 256", case_small_cache),
        (5, "causal folder with only pytorch_model.bin", lambda cwd: case_pickled(cwd, folders)),
        (5, "config.json with an unknown model_type", lambda cwd: one_line(dlmscope(
            ["generate", "--model", str(copy_with(folders, "causal", cwd / "odd", model_type="no_such_arch"))], cwd))),
        (5, "mask_token_id past the vocabulary", lambda cwd: one_line(dlmscope(
            ["generate", "--model", str(copy_with(folders, "llada", cwd / "mask", mask_token_id=10**6))], cwd))),
        (6, "generate-blocks, 9,000-token prompt, 4,096 context", case_long_prompt),
        (6, "eval-splice --context-length 5000", cli("eval-splice", "--sae", "tiny-dlm-L1-k32", "--context-length",
                                                     "5000")),
        (6, "diff --nu-max -1", cli("diff", "--checkpoints", "dlmscope-tiny-dlm,dlmscope-tiny-dlm", "--nu-max", "-1")),
        (6, "diff --nu-max nan", cli("diff", "--checkpoints", "dlmscope-tiny-dlm,dlmscope-tiny-dlm", "--nu-max",
                                     "nan")),
        (6, "train-sae --bandwidth -1", cli("train-sae", "--architecture", "jumprelu", "--bandwidth", "-1")),
        (6, "evaluate --probe-k 99999", cli("evaluate", "--sae", "tiny-dlm-L1-k32", "--probe-k", "99999", "--n-seqs", "2")),
        (6, "a model whose weights hold a NaN", lambda cwd: case_nan_weights(cwd, folders)),
        (7, "train-sae --dataset wrong.jsonl", lambda cwd: (cwd / "wrong.jsonl").write_text(
            '{"text": "a"}\n{"other": 1}\n')
         and one_line(dlmscope(["train-sae", "--dataset", "wrong.jsonl", *T], cwd))),
        (7, "eval-splice -m dlmscope-tiny-ar", cli("eval-splice", "--sae", "tiny-dlm-L1-k32", "-m",
                                                   "dlmscope-tiny-ar")),
        (7, "diff --checkpoints tiny-dlm,tiny-ar", cli("diff", "--checkpoints", "dlmscope-tiny-dlm,dlmscope-tiny-ar")),
        (7, "rspo --model dlmscope-tiny-ar", cli("rspo", "--model", "dlmscope-tiny-ar")),
        (7, "--policy error lists no empty entry", case_policy_list),
        (7, "truncated RL checkpoint repaired on rspo --resume", case_truncated_rl_checkpoint),
    ]


def run(args) -> dict:
    """Every case, or with --rerun I,J,... only those (by position), replacing them in the saved JSON (marked
    `rerun`): for cases whose first run was disturbed, e.g. by the code changing under it."""
    only = {int(i) for i in args.rerun.split(",")} if args.rerun else None
    rows = json.loads((args.out / "reliability_probe.json").read_text())["cases"] if only else []
    with tempfile.TemporaryDirectory() as tmp:
        folders = tiny_folders(Path(tmp) / "models")
        for i, (category, name, fn) in enumerate(cases(folders)):
            if only is not None and i not in only:
                continue
            cwd = Path(tmp) / f"case{i:02d}"
            cwd.mkdir()
            result = {"category": category, "case": name, **fn(cwd), **({"rerun": True} if only else {})}
            if only:
                rows[i] = result
            else:
                rows.append(result)
            print(f"[{'ok' if result['ok'] else 'FAIL'}] {i} {category} {name}: {result.get('stderr', [''])[-1:]}",
                  flush=True)
    return {"cases": rows, "note": "ok = exit 2 with one `error:` line and nothing else printed (data-loss and "
                                   "repair cases: files kept / rewritten)"}


def render(results: dict, out: Path) -> str:
    lines = ["| # | category | cases | one line, exit 2 (or files kept / repaired) |", "|---|---|---|---|"]
    for c, label in CATEGORIES.items():
        rows = [r for r in results["cases"] if r["category"] == c]
        lines.append(f"| {c} | {label} | {len(rows)} | {sum(r['ok'] for r in rows)} |")
    rows = results["cases"]
    lines.append(f"| | all | {len(rows)} | {sum(r['ok'] for r in rows)} |")
    return "\n".join(lines)


def readme_table(results: dict) -> str:
    return render(results, Path("."))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rerun", default="", help="comma-separated case positions to run again (see run)")
    run_or_render(parser, "reliability_probe", run, render)
