"""Text sources: the built-in offline corpus, local files, local Hugging Face datasets; packing to rows."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import os
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DLMScopeError
from .io_utils import atomic_write_json

CORPUS_VERSION = 2
HELDOUT_PERCENT = 5
SPLITS = ("train", "heldout")
# Modules whose import opens windows, a browser, prints, or takes long.
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "__hello__",
         "__phello__", "lib2to3", "pydoc_data", "ensurepip", "venv", "test", "xxlimited", "xxlimited_35",
         "xxsubtype", "_xxtestfuzz", "_testcapi", "_testinternalcapi", "_testmultiphase", "_testbuffer",
         "_testimportmultiple", "_testsinglephase", "_testclinic", "_ctypes_test", "_xxsubinterpreters",
         "msvcrt", "winreg", "winsound", "_winapi", "nturl2path", "_msi", "msilib", "_overlapped", "asyncio.windows_events"}


def cache_dir() -> Path:
    return Path(os.environ.get("DLMSCOPE_CACHE", Path.home() / ".cache" / "dlmscope"))


def _clean(paragraph: str) -> str | None:
    """Normalise whitespace; drop fragments that are short or mostly code."""
    text = re.sub(r"\s+", " ", paragraph).strip()
    if len(text) < 40 or text.startswith((">>>", "...", "$ ")):
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters / len(text) < 0.8:
        return None
    return text


def _paragraphs(text: str) -> list[str]:
    return [c for p in re.split(r"\n\s*\n", text) if (c := _clean(p))]


def _stdlib_docstrings() -> list[str]:
    docs: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if name in _SKIP or name.startswith("_"):
            continue
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - any import failure just drops the module
            continue
        members = [module] + [obj for _, obj in sorted(vars(module).items(), key=lambda kv: kv[0])
                              if (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == name]
        for obj in members:
            objs = [obj] + ([v for _, v in sorted(vars(obj).items(), key=lambda kv: kv[0]) if inspect.isfunction(v)]
                            if inspect.isclass(obj) else [])
            for o in objs:
                doc = o.__doc__ if isinstance(getattr(o, "__doc__", None), str) else None
                if doc:
                    docs.extend(_paragraphs(inspect.cleandoc(doc)))
    return docs


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


def builtin_corpus(split: str = "train", debian_docs: bool = False) -> list[str]:
    """Python reference prose and standard-library docstrings: cleaned, deduplicated, split by text hash.

    `debian_docs` adds the python3.11-doc reST sources (an error if not installed). Built once per
    Python version and cached (`$DLMSCOPE_CACHE`, default ~/.cache/dlmscope).
    """
    if split not in SPLITS:
        raise DLMScopeError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if debian_docs and not DEBIAN_DOCS.is_dir():
        raise DLMScopeError(f"debian_docs=True but {str(DEBIAN_DOCS)!r} is missing; apt-get install python3.11-doc")
    tag = "-debian" if debian_docs else ""
    path = cache_dir() / f"corpus-v{CORPUS_VERSION}{tag}-py{sys.version_info[0]}{sys.version_info[1]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())[split]
        except (json.JSONDecodeError, KeyError):
            pass  # a damaged cache is rebuilt
    seen: set[str] = set()
    docs = []
    for text in _topic_prose() + _stdlib_docstrings() + (_debian_docs() if debian_docs else []):
        if text not in seen:
            seen.add(text)
            docs.append(text)
    corpus = {s: [d for d in docs if _split_of(d) == s] for s in SPLITS}
    atomic_write_json(path, corpus)
    return corpus[split]


def load_texts(source: str = "builtin", split: str = "train", column: str = "text", limit: int | None = None) -> list[str]:
    """Documents from "builtin", a local .txt/.jsonl/.parquet file, or a locally available HF dataset."""
    if source == "builtin":
        texts = builtin_corpus(split)
    else:
        path = Path(source).expanduser()
        suffix = path.suffix.lower()
        if suffix in (".txt", ".jsonl", ".json", ".parquet") and not path.exists():
            raise DLMScopeError(f"corpus file {source!r} does not exist")
        if suffix == ".txt":
            texts = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]
        elif suffix in (".jsonl", ".json", ".parquet") or path.is_dir() or not path.suffix:
            texts = _dataset_texts(path, source, split, column)
        else:
            raise DLMScopeError(f"unknown corpus file type {path.suffix!r}; allowed: .txt, .jsonl, .parquet, or a dataset")
    if not texts:
        raise DLMScopeError(f"text source {source!r} (split {split!r}) is empty")
    return texts[:limit] if limit else texts


def _dataset_texts(path: Path, source: str, split: str, column: str) -> list[str]:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        elif path.suffix.lower() == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        elif path.is_dir() and (path / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(source, split=split)
    except DLMScopeError:
        raise
    except Exception as e:  # offline hub misses and malformed files alike
        raise DLMScopeError(f"cannot load dataset {source!r} offline: {str(e).splitlines()[0]}") from None
    if column not in ds.column_names:
        raise DLMScopeError(f"dataset {source!r} has no column {column!r}; available: {', '.join(ds.column_names)}")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


@dataclass
class PackedData:
    """Token rows of fixed length with the document id of every token (-1 on padding)."""

    input_ids: torch.Tensor
    doc_ids: torch.Tensor
    attention_mask: torch.Tensor


def pack(tokenizer, texts: list[str], context_length: int, *, cross_document: bool = True) -> PackedData:
    """Tokenise with BOS/EOS around each document and cut into rows of `context_length`.

    `cross_document=False` gives each row tokens of one document only (truncated, right-padded).
    """
    if context_length < 2:
        raise DLMScopeError(f"context_length={context_length} must be >= 2")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    docs = [[bos, *ids, eos] for ids in encoded]
    if cross_document:
        flat = torch.tensor([t for d in docs for t in d], dtype=torch.long)
        owner = torch.tensor([i for i, d in enumerate(docs) for _ in d], dtype=torch.long)
        n = flat.numel() // context_length
        if n == 0:
            raise DLMScopeError(f"the texts give {flat.numel()} tokens, fewer than one row of {context_length}")
        ids = flat[: n * context_length].view(n, context_length)
        return PackedData(ids, owner[: n * context_length].view(n, context_length), torch.ones_like(ids))
    rows = [d[:context_length] for d in docs]
    if not rows:
        raise DLMScopeError("no documents to pack")
    ids = torch.full((len(rows), context_length), pad, dtype=torch.long)
    doc_ids = torch.full_like(ids, -1)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        doc_ids[i, : len(row)] = i
    return PackedData(ids, doc_ids, (doc_ids >= 0).long())


def heldout_rows(tokenizer, context_length: int = 128, n: int | None = None) -> torch.Tensor:
    """Packed rows of the built-in held-out split (the same on every machine): the evaluation set."""
    rows = pack(tokenizer, builtin_corpus("heldout"), context_length).input_ids
    return rows[:n] if n else rows
