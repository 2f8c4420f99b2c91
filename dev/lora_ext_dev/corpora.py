"""Two real text corpora that ship with every Python, split into training and held-out text.

- task ``"docs"``: the Python reference documentation, ``pydoc_data.topics`` (79 topics);
- task ``"code"``: the standard library's own Python source (the top-level ``*.py`` modules of the running
  interpreter's stdlib folder).

Documents (a topic, a module) are assigned to the held-out side by a fixed hash rule on their name
(:func:`is_heldout`), so the split is the same on every machine and for every run. Topics repeat whole
paragraphs of each other (grammar snippets, shared notes: 377 of the 644 held-out "docs" paragraphs are
kept), so held-out paragraphs that occur verbatim in the training text are dropped (:func:`remove_overlap`). Text becomes
fixed-length token windows with :func:`token_windows`.
"""

from __future__ import annotations

import hashlib
import re
import sysconfig
from pathlib import Path
from typing import Callable

import torch

TASKS = ("docs", "code")
HELDOUT_PERCENT = 15
SPLIT_SALT = "lora_ext-corpus-split-v1"


def docs_documents() -> dict[str, str]:
    """The reference manual's topics, by topic name."""
    from pydoc_data.topics import topics

    return {name: text for name, text in sorted(topics.items())}


def code_documents() -> dict[str, str]:
    """The standard library's top-level modules' source, by module name (``os``, ``argparse``, ...)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for path in sorted(stdlib.glob("*.py")):
        try:
            out[path.stem] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    if not out:
        raise FileNotFoundError(f"corpora: no *.py files in the standard library folder {stdlib}")
    return out


DOCUMENTS: dict[str, Callable[[], dict[str, str]]] = {"docs": docs_documents, "code": code_documents}


def is_heldout(name: str, percent: int = HELDOUT_PERCENT) -> bool:
    """The fixed split rule: a document is held out when the hash of its name falls in the first
    ``percent`` of 100 buckets."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def split(documents: dict[str, str], percent: int = HELDOUT_PERCENT) -> tuple[dict[str, str], dict[str, str]]:
    """``(train, heldout)`` documents by :func:`is_heldout`."""
    train = {k: v for k, v in documents.items() if not is_heldout(k, percent)}
    heldout = {k: v for k, v in documents.items() if is_heldout(k, percent)}
    if not train or not heldout:
        raise ValueError(
            f"corpora.split: expected documents on both sides, got {len(train)} training and "
            f"{len(heldout)} held-out of {len(documents)}"
        )
    return train, heldout


def paragraphs(text: str) -> list[str]:
    """The text's paragraphs: runs of lines separated by blank lines, stripped."""
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _norm(s: str) -> str:
    return " ".join(s.split())


def remove_overlap(heldout: dict[str, str], train: dict[str, str], min_chars: int = 1) -> dict[str, str]:
    """The held-out documents without every paragraph (of at least ``min_chars`` characters) that occurs
    verbatim in the training text: equal to a training paragraph up to whitespace, or a substring of a
    training document starting at the beginning of a line (its first line, stripped, is a whole training
    line); a paragraph that occurs only from the middle of a training line is not caught. Documents left
    empty are dropped."""
    train_pars = {_norm(p) for text in train.values() for p in paragraphs(text)}
    train_lines = {line.strip() for text in train.values() for line in text.splitlines() if line.strip()}
    train_texts = list(train.values())
    out = {}
    for name, text in heldout.items():
        kept = []
        for p in paragraphs(text):
            if len(p) >= min_chars:
                if _norm(p) in train_pars:
                    continue
                first = p.splitlines()[0].strip()
                # the set lookup on the first line rules out almost every paragraph before the full search
                if first in train_lines and any(p in t for t in train_texts):
                    continue
            kept.append(p)
        if kept:
            out[name] = "\n\n".join(kept)
    return out


def task_split(task: str, percent: int = HELDOUT_PERCENT) -> tuple[dict[str, str], dict[str, str]]:
    """``(train, heldout)`` documents of ``task``, the held-out side without training-text overlap."""
    if task not in DOCUMENTS:
        raise ValueError(f"corpora.task_split: expected a task in {TASKS}, got {task!r}")
    train, heldout = split(DOCUMENTS[task](), percent)
    return train, remove_overlap(heldout, train)


def token_windows(tokenizer, documents: dict[str, str], seq_len: int) -> torch.Tensor:
    """The documents tokenized, joined with the EOS token between them, cut into non-overlapping windows of
    ``seq_len`` tokens: a ``[n, seq_len]`` int64 tensor (the incomplete tail is dropped)."""
    if seq_len < 2:
        raise ValueError(f"corpora.token_windows: expected seq_len >= 2, got {seq_len}")
    ids: list[int] = []
    texts = list(documents.values())
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for toks in encoded:
        ids.extend(toks)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def spread(windows: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` windows evenly spaced over all of them (the held-out set covers every held-out document)."""
    if n >= windows.shape[0]:
        return windows
    idx = torch.linspace(0, windows.shape[0] - 1, n).round().long()
    return windows[idx]
