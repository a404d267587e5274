"""Build the default n-gram model files from text every Python install carries.

``python -m backends.build_models --out models`` writes ``tiny.ngram`` (a trigram model of
the standard library's docstrings, ~5 MB) and ``base.ngram`` (a 4-gram model of every
string literal and comment in the standard library including its tests, ~10x bigger).
Files are walked in sorted order and the encoding is deterministic, so the same Python
installation always yields the same bytes. Files are written atomically, so a
concurrent reader never sees half a model.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import sysconfig
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import msgspec

from backends.loaders.ngram import BOUNDARY, NGramModel
from backends.loaders.ngram import tokenize as words

_PARAGRAPH = re.compile(r"\n\s*\n")
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib2to3"})


class ModelRecipe(msgspec.Struct, frozen=True):
    """What one default model is made of."""

    name: str
    order: int
    include_tests: bool
    comments: bool
    all_strings: bool  # every string literal, not only triple-quoted (doc)strings


RECIPES = (
    ModelRecipe(name="tiny", order=3, include_tests=False, comments=False, all_strings=False),
    ModelRecipe(name="base", order=4, include_tests=True, comments=True, all_strings=True),
)


class FileText(msgspec.Struct, frozen=True):
    """Tokenised text of one source file, by kind; ``BOUNDARY`` separates paragraphs."""

    is_test: bool
    docstrings: list[str]
    comments: list[str]
    strings: list[str]


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted order (third-party dirs skipped)."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return found


def _is_prose(toks: Sequence[str]) -> bool:
    """At least half words: drops rulers like ``# ------`` and ASCII art."""
    return bool(toks) and 2 * sum(1 for t in toks if t[0].isalnum() or t[0] == "_") >= len(toks)


def _paragraph_tokens(text: str) -> list[str]:
    out: list[str] = []
    for para in _PARAGRAPH.split(text):
        toks = words(para)
        if _is_prose(toks):
            out.extend(toks)
            out.append(BOUNDARY)
    return out


#: A one-pass lexer for what the corpus needs: comments and string literals, in source order
#: (so a ``#`` inside a string is part of the string). Much faster than ``tokenize``.
_LEXER = re.compile(
    r"""
      (?P<comment>\#[^\n]*)
    | (?P<prefix>[rRbBuUfF]{0,2})
      (?: (?P<quote3>\"\"\"|\'\'\') (?P<body3>.*?) (?P=quote3)
        | (?P<quote1>["']) (?P<body1>(?:\\.|(?!(?P=quote1))[^\\\n])*) (?P=quote1) )
    """,
    re.S | re.X,
)


def extract(path_and_root: tuple[str, str]) -> FileText:
    """Tokenise one file's comments and string literals (an unreadable file is skipped).

    Triple-quoted strings count as docstrings; bytes literals are skipped; consecutive
    full-line comments form one paragraph.
    """
    path, root = path_and_root
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    is_test = "/test" in "/" + rel or "idle_test" in rel
    docstrings: list[str] = []
    comments: list[str] = []
    strings: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
    except (OSError, UnicodeDecodeError):
        return FileText(is_test, [], [], [])
    comment_end = -1
    for match in _LEXER.finditer(source):
        if match.group("comment") is not None:
            text = words(match.group("comment").lstrip("#!"))
            if not _is_prose(text):
                continue
            between = source[comment_end : match.start()] if comment_end >= 0 else "\n\n"
            new_paragraph = between.count("\n") != 1 or bool(between.strip())
            if new_paragraph and comments and comments[-1] != BOUNDARY:
                comments.append(BOUNDARY)
            comments.extend(text)
            comment_end = match.end()
        elif "b" not in match.group("prefix").lower():
            if match.group("quote3") is not None:
                docstrings.extend(_paragraph_tokens(match.group("body3")))
            else:
                strings.extend(_paragraph_tokens(match.group("body1")))
    if comments and comments[-1] != BOUNDARY:
        comments.append(BOUNDARY)
    return FileText(is_test, docstrings, comments, strings)


def collect(jobs: int, root: Path | None = None) -> list[FileText]:
    """Extract every stdlib file, in parallel, keeping the sorted file order."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    items = [(str(p), str(base)) for p in stdlib_sources(base)]
    if jobs <= 1:
        return [extract(item) for item in items]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(extract, items, chunksize=16))


def documents(files: Sequence[FileText], recipe: ModelRecipe) -> list[list[str]]:
    """The token documents a recipe trains on, in file order."""
    docs: list[list[str]] = []
    for f in files:
        if f.is_test and not recipe.include_tests:
            continue
        parts = (
            f.docstrings,
            f.comments if recipe.comments else [],
            f.strings if recipe.all_strings else [],
        )
        for part in parts:
            if part:
                docs.append(part)
    return docs


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build(out: Path, names: Sequence[str] = ("tiny", "base"), jobs: int = 2) -> dict[str, int]:
    """Build the named default models into ``out``; returns file sizes in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    files = collect(jobs)
    sizes: dict[str, int] = {}
    for recipe in RECIPES:
        if recipe.name not in names:
            continue
        model = NGramModel.build(recipe.name, documents(files, recipe), recipe.order)
        data = model.to_bytes()
        write_atomic(out / f"{recipe.name}.ngram", data)
        sizes[recipe.name] = len(data)
    return sizes


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m backends.build_models", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("models"), help="output directory")
    parser.add_argument(
        "--only", choices=[r.name for r in RECIPES], action="append", help="build only this model"
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sizes = build(args.out, args.only or [r.name for r in RECIPES], args.jobs)
    elapsed = time.perf_counter() - started
    for name, size in sizes.items():
        print(f"{args.out / (name + '.ngram')}: {size} bytes", file=sys.stderr)
    print(f"built {len(sizes)} model(s) in {elapsed:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
