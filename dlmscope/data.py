"""Text sources: the built-in offline corpus, local files, local Hugging Face datasets; packing to rows."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from .errors import DLMScopeError
from .io_utils import atomic_write_json

CORPUS_VERSION = 3
HELDOUT_PERCENT = 5
"""Kept at 5 (not 2) so the held-out split the shipped twins were evaluated on stays held out."""
SPLITS = ("train", "heldout")
BUILD_TIMEOUT_S = 120


def cache_dir() -> Path:
    return Path(os.environ.get("DLMSCOPE_CACHE", Path.home() / ".cache" / "dlmscope"))


def _clean(paragraph: str) -> str | None:
    """Normalise whitespace; drop fragments that are short, doctests, or mostly symbols."""
    text = re.sub(r"\s+", " ", paragraph).strip()
    if len(text) < 40 or text.startswith(("...", "$ ")) or ">>>" in text:
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters / len(text) < 0.8:
        return None
    return text


def _paragraphs(text: str) -> list[str]:
    return [c for p in re.split(r"\n\s*\n", text) if (c := _clean(p))]


def _extract_docstrings(top: list[str], subs: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Docstrings of the pinned standard-library modules, run in a fresh `python -I -S` (no side effects here).

    Returns (core, extra, missing): core = each top-level module, its classes and functions and their
    Python methods (the corpus before version 3, kept first so earlier splits keep their order);
    extra = the rest of those classes' members (C methods, properties) and the submodules; missing =
    pinned modules that failed to import or printed. Sorted names throughout: deterministic output.
    """
    import contextlib
    import importlib
    import inspect
    import io

    def quiet_import(name):
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - any failure (even SystemExit) only drops the module
            return None
        return None if out.getvalue() else module

    def doc(obj):
        text = getattr(obj, "__doc__", None)
        return [inspect.cleandoc(text)] if isinstance(text, str) and text.strip() else []

    def members(obj, keep):
        return [v for _, v in sorted(vars(obj).items(), key=lambda kv: kv[0]) if keep(v)]

    def own(name):
        return lambda v: ((inspect.isclass(v) or inspect.isfunction(v))
                          and getattr(v, "__module__", None) == name)

    def is_member(v):
        described = inspect.isroutine(v) or isinstance(v, (property, classmethod, staticmethod))
        return described and not inspect.isfunction(v)

    core, extra, missing = [], [], []
    for name in top:
        if (module := quiet_import(name)) is None:
            missing.append(name)
            continue
        for obj in [module] + members(module, own(name)):
            core += doc(obj)
            if inspect.isclass(obj):
                core += [d for f in members(obj, inspect.isfunction) for d in doc(f)]
                extra += [d for m in members(obj, is_member) for d in doc(m)]
        extra += [d for f in members(module, inspect.isbuiltin) for d in doc(f)]
    for name in subs:
        if (module := quiet_import(name)) is None:
            missing.append(name)
            continue
        for obj in [module] + members(module, own(name)):
            extra += doc(obj)
            if inspect.isclass(obj):
                extra += [d for f in members(obj, lambda v: inspect.isfunction(v) or is_member(v)) for d in doc(f)]
    return core, extra, missing


def _stdlib_docstrings() -> list[str]:
    from .corpus_modules import SUBMODULES, TOP_LEVEL

    code = f"{inspect.getsource(_extract_docstrings)}\nimport json, sys\n" \
           f"json.dump(_extract_docstrings({list(TOP_LEVEL)!r}, {list(SUBMODULES)!r}), sys.stdout)"
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S, check=True)
    except subprocess.TimeoutExpired:
        raise DLMScopeError(f"reading standard-library docstrings took over {BUILD_TIMEOUT_S} s; "
                            "set DLMSCOPE_CACHE to a folder holding a built corpus") from None
    except subprocess.CalledProcessError as e:
        last = (e.stderr.strip().splitlines() or ["no output"])[-1]
        raise DLMScopeError(f"reading standard-library docstrings failed: {last}") from None
    core, extra, missing = json.loads(done.stdout)
    if missing:
        warnings.warn(f"built-in corpus: {len(missing)} pinned standard-library module(s) do not import on this "
                      f"Python ({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}); their paragraphs "
                      "are missing, so the splits differ from the reference build", stacklevel=2)
    return [p for text in core + extra for p in _paragraphs(text)]


def _topic_prose() -> list[str]:
    from pydoc_data.topics import topics

    return [p for key in sorted(topics) for p in _paragraphs(topics[key])]


DEBIAN_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
"""reST sources of the Python documentation from Debian's python3.11-doc package, when installed."""


def _rest_to_text(text: str) -> str:
    text = re.sub(r"^\.\. .*$", "", text, flags=re.M)  # directives and comments
    text = re.sub(r"^[=\-~^\"'*#+]{3,}\s*$", "", text, flags=re.M)  # section underlines
    text = re.sub(r":[\w:.+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)  # :role:`target <x>`
    text = re.sub(r"`([^`<]*?)(?:\s*<[^>]*>)?`_{0,2}", r"\1", text)  # links
    return text.replace("``", "").replace("**", "").replace("*", "")


def _debian_docs() -> list[str]:
    return [p for f in sorted(DEBIAN_DOCS.rglob("*.rst.txt"))
            for p in _paragraphs(_rest_to_text(f.read_text(encoding="utf-8", errors="replace")))]


def _split_of(text: str) -> str:
    h = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def _corpus(debian_docs: bool) -> dict[str, list[str]]:
    if debian_docs and not DEBIAN_DOCS.is_dir():
        raise DLMScopeError(f"debian_docs=True but {str(DEBIAN_DOCS)!r} is missing; "
                            "apt-get install python3.11-doc")
    tag = "-debian" if debian_docs else ""
    path = cache_dir() / f"corpus-v{CORPUS_VERSION}{tag}-py{sys.version_info[0]}{sys.version_info[1]}.json"
    if path.is_file():
        try:
            corpus = json.loads(path.read_text(encoding="utf-8"))
            if all(isinstance(corpus.get(s), list) for s in SPLITS):
                return corpus
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass  # a damaged cache is rebuilt
    docs = dict.fromkeys(_topic_prose() + _stdlib_docstrings() + (_debian_docs() if debian_docs else []))
    corpus = {s: [d for d in docs if _split_of(d) == s] for s in SPLITS}
    atomic_write_json(path, corpus)
    return corpus


def builtin_corpus(split: str = "train", debian_docs: bool = False) -> list[str]:
    """Python reference prose and standard-library docstrings: cleaned paragraphs, deduplicated, split by text hash.

    The held-out split is the paragraphs whose SHA-1 falls in the lowest `HELDOUT_PERCENT` percent, so
    it is the same on every machine with the same Python minor version. `debian_docs` adds the
    python3.11-doc reST sources (an error if not installed). Built once and cached as JSON under
    `$DLMSCOPE_CACHE` (default ~/.cache/dlmscope).
    """
    if split not in SPLITS:
        raise DLMScopeError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    return _corpus(debian_docs)[split]


def corpus_stats(debian_docs: bool = False) -> dict[str, dict[str, int]]:
    """Documents and characters of each split of the built-in corpus."""
    corpus = _corpus(debian_docs)
    return {s: {"documents": len(corpus[s]), "characters": sum(map(len, corpus[s]))} for s in SPLITS}


TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def load_texts(source: str = "builtin", split: str = "train", column: str = "text", limit: int | None = None) -> list[str]:
    """Documents from "builtin", a local .txt (blank-line separated) / .jsonl / .parquet file, or a local HF dataset.

    A dataset is a `save_to_disk` folder or a name/path `datasets.load_dataset` resolves offline; this
    never downloads. `split` picks the split of the built-in corpus or of the dataset.
    """
    if limit is not None and limit < 1:
        raise DLMScopeError(f"limit={limit} must be a positive number of documents (or None for all)")
    if source == "builtin":
        texts = builtin_corpus(split)
    else:
        path = Path(source).expanduser()
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES and not path.is_file():
            raise DLMScopeError(f"text file {source!r} does not exist")
        if suffix == ".txt":
            texts = [p.strip() for p in re.split(r"\n\s*\n", _utf8_text(path)) if p.strip()]
        elif suffix in TEXT_SUFFIXES or path.is_dir() or not path.suffix or not path.exists():
            texts = _dataset_texts(path, source, split, column)
        else:
            raise DLMScopeError(f"unknown text file type {path.suffix!r} of {source!r}; allowed: "
                                f"{', '.join(TEXT_SUFFIXES)}, a dataset folder, or a local dataset name")
    if not texts:
        raise DLMScopeError(f"text source {source!r} (split {split!r}) has no non-empty texts")
    return texts[:limit]


def _utf8_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DLMScopeError(f"text file {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                            f"{e.start}); give a .txt, .jsonl or .parquet file of text") from None


def _offline() -> ExitStack:
    """Make `datasets` and the hub offline for the duration of a `with` block, whenever they were imported."""
    import datasets
    import huggingface_hub.constants

    stack = ExitStack()
    stack.enter_context(mock.patch.dict(os.environ, {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}))
    stack.enter_context(mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True))
    stack.enter_context(mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True))
    if datasets.is_progress_bar_enabled():  # "Generating train split" bars are noise before a possible one-line error
        datasets.disable_progress_bars()
        stack.callback(datasets.enable_progress_bars)
    return stack


def _dataset_texts(path: Path, source: str, split: str, column: str) -> list[str]:
    import datasets

    suffix = path.suffix.lower()
    try:
        with _offline():
            if suffix in (".jsonl", ".json", ".parquet"):
                builder = "parquet" if suffix == ".parquet" else "json"
                ds = datasets.load_dataset(builder, data_files=str(path), split="train")
            elif path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(source)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DLMScopeError(f"dataset {source!r} has no split {split!r}; available: {', '.join(ds)}")
                ds = ds[split]
    except DLMScopeError:
        raise
    except Exception as e:  # noqa: BLE001 - offline hub misses and malformed files alike
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DLMScopeError(f"cannot load dataset {source!r} offline: {first}") from None
    if column not in ds.column_names:
        raise DLMScopeError(f"dataset {source!r} has no column {column!r}; available: {', '.join(ds.column_names)}")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


@dataclass
class PackedData:
    """Token rows of fixed length with the document id (index into the texts) of every token, -1 on padding."""

    input_ids: torch.Tensor
    doc_ids: torch.Tensor
    attention_mask: torch.Tensor
    """1 on tokens, 0 on padding (all ones when packed across documents)."""


def pack(tokenizer, texts: list[str], context_length: int, *, cross_document: bool = True) -> PackedData:
    """Tokenise each text as BOS + tokens + EOS and cut into rows of `context_length`.

    `cross_document=True` concatenates all documents and drops the last partial row. With False every
    row holds tokens of one document only: a long document fills several rows, the last one right-padded
    with the pad id (attention_mask 0 there).
    """
    if context_length < 2:
        raise DLMScopeError(f"context_length={context_length} must be >= 2")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if None in (bos, eos) or (pad is None and not cross_document):
        raise DLMScopeError(f"tokenizer {type(tokenizer).__name__} lacks a BOS, EOS or pad token; "
                            "use one from dlmscope.tokenizer.train_tokenizer")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    docs = [[bos, *ids, eos] for ids in encoded]
    n_tokens = sum(map(len, docs))
    if cross_document:
        if n_tokens < context_length:
            raise DLMScopeError(f"the texts give {n_tokens} tokens, fewer than one row of {context_length}")
        flat = torch.tensor([t for d in docs for t in d], dtype=torch.long)
        owner = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(list(map(len, docs))))
        n = n_tokens // context_length * context_length
        ids = flat[:n].view(-1, context_length)
        return PackedData(ids, owner[:n].view(-1, context_length), torch.ones_like(ids))
    if not docs:
        raise DLMScopeError("no texts to pack")
    rows = [(i, d[s: s + context_length]) for i, d in enumerate(docs) for s in range(0, len(d), context_length)]
    ids = torch.full((len(rows), context_length), pad, dtype=torch.long)
    doc_ids = torch.full_like(ids, -1)
    for r, (i, row) in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        doc_ids[r, : len(row)] = i
    return PackedData(ids, doc_ids, (doc_ids >= 0).long())


def heldout_rows(tokenizer, context_length: int = 128, n: int | None = None) -> torch.Tensor:
    """Packed rows of the built-in held-out split (the same on every machine): the evaluation set."""
    rows = pack(tokenizer, builtin_corpus("heldout"), context_length).input_ids
    return rows[:n] if n else rows
