"""docs/errors.md, the census of bad input, cannot rot: it has at least 60 rows, every test it
names exists (node ids, parametrized ids included, resolved from the test files' syntax trees, so
no test module is imported and this takes well under a second), and every message text it quotes
occurs in the named tests' sources or in the library's source. Known gaps are strict xfails."""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
HEADER = ["area", "bad input", "error", "test"]
AREAS = ["op", "layer", "model API", "adapter files", "per-row batches", "C++ API", "concurrency & crash"]
# what the error column may start with: exception types, or that there is none
ERROR_TYPES = {
    "RuntimeError",
    "ValueError",
    "TypeError",
    "IndexError",
    "NotImplementedError",
    "FileNotFoundError",
    "OSError",
    "UserWarning",
    "c10::Error",
    "no error",
}
MIN_ROWS = 60
CODE = re.compile(r"`([^`]+)`")


@dataclass
class Row:
    line: int
    area: str
    bad_input: str
    types: list[str]  # leading code spans of the error column that are exception types
    texts: list[str]  # the other code spans of the error column: the essential message texts
    node_ids: list[str]  # code spans of the test column with "::"
    files: list[str]  # other code spans of the test column: further sources of those tests

    def where(self) -> str:
        return f"docs/errors.md:{self.line} ({self.area}: {self.bad_input})"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def parse_table(text: str) -> list[Row]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and _cells(line) == HEADER)
    rows = []
    for i in range(start + 2, len(lines)):
        if not lines[i].startswith("|"):
            break
        area, bad, error, test = _cells(lines[i])
        spans = CODE.findall(error)
        n_types = next((k for k, s in enumerate(spans) if s not in ERROR_TYPES), len(spans))
        test_spans = CODE.findall(test)
        rows.append(
            Row(
                i + 1,
                area,
                bad,
                spans[:n_types],
                spans[n_types:],
                [s for s in test_spans if "::" in s],
                [s for s in test_spans if "::" not in s],
            )
        )
    return rows


def known_gaps(text: str) -> list[tuple[str, list[str]]]:
    """(node id, further source files) of every bullet under '## Known gaps'."""
    if "## Known gaps" not in text:  # none open: every gap found so far is fixed
        return []
    section = text.split("## Known gaps", 1)[1]
    out = []
    for bullet in re.findall(r"^- (.*)$", section, flags=re.M):
        spans = CODE.findall(bullet)
        out.append((spans[0], [s for s in spans[1:] if s.startswith("tests/")]))
    return out


# -- node ids, statically --------------------------------------------------------------------
class Unsupported(Exception):
    """A parametrization this static reader does not evaluate (the census must not cite it)."""


_OPAQUE = object()  # a value not known without running the test module
_NON_PRINTABLE = {i: f"\\x{i:02x}" for i in range(128) if i not in range(32, 127)}


def _escape(s: str) -> str:
    """pytest's ascii_escaped: how a str becomes (part of) a test id."""
    return s.encode("unicode_escape").decode("ascii").translate(_NON_PRINTABLE)


def _value(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "float"
        and len(node.args) == 1
        and not node.keywords
    ):
        arg = _value(node.args[0])
        if isinstance(arg, (str, int, float)) and arg is not _OPAQUE:
            return float(arg)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _value(node.operand)
        if isinstance(v, (int, float)) and v is not _OPAQUE:
            return -v
    return _OPAQUE


def _elements(node: ast.AST, assigns: dict[str, ast.AST]) -> list[ast.AST]:
    """The argvalues of a parametrize as syntax nodes: a literal list, a module-level list or dict
    (iterated: its keys), or list()/sorted() of those."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return list(node.elts)
    if isinstance(node, ast.Name) and node.id in assigns:
        value = assigns[node.id]
        if isinstance(value, ast.Dict) and None not in value.keys:
            return list(value.keys)
        if isinstance(value, (ast.List, ast.Tuple)):
            return list(value.elts)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("list", "sorted")
        and len(node.args) == 1
        and not node.keywords
    ):
        elts = _elements(node.args[0], assigns)
        if node.func.id == "sorted":
            values = [_value(e) for e in elts]
            if any(v is _OPAQUE for v in values):
                raise Unsupported(ast.unparse(node))
            elts = [e for _, e in sorted(zip(values, elts), key=lambda p: p[0])]
        return elts
    raise Unsupported(ast.unparse(node))


def _idval(val, argname: str, idx: int) -> str:
    """pytest's id of one auto-identified parameter value."""
    if isinstance(val, str) and val is not _OPAQUE:
        return _escape(val) if len(val) <= 100 else f"{argname}{idx}"
    if val is None or (isinstance(val, (int, float, complex)) and val is not _OPAQUE):
        return str(val)
    return f"{argname}{idx}"


def _unique(ids: list[str]) -> list[str]:
    """pytest's suffixes for ids that occur more than once in one parametrize."""
    counts = {i: ids.count(i) for i in ids}
    out, next_suffix = list(ids), {}
    for k, i in enumerate(ids):
        if counts[i] > 1:
            sep = "_" if i and i[-1].isdigit() else ""
            n = next_suffix.get(i, 0)
            while f"{i}{sep}{n}" in set(out):
                n += 1
            out[k] = f"{i}{sep}{n}"
            next_suffix[i] = n + 1
    return out


def _parametrize_ids(call: ast.Call, assigns: dict[str, ast.AST]) -> list[str]:
    args = {k.arg: k.value for k in call.keywords}
    names_node = call.args[0] if call.args else args["argnames"]
    values_node = call.args[1] if len(call.args) > 1 else args["argvalues"]
    names = _value(names_node)
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    rows = []
    for el in _elements(values_node, assigns):
        if isinstance(el, ast.Call) and ast.unparse(el.func).endswith("param"):  # pytest.param(..., id=...)
            raise Unsupported(ast.unparse(el))
        comps = [el] if len(names) == 1 else list(el.elts) if isinstance(el, (ast.Tuple, ast.List)) else None
        if comps is None or len(comps) != len(names):
            raise Unsupported(ast.unparse(el))
        rows.append([_value(c) for c in comps])
    ids_node = args.get("ids")
    if ids_node is None:
        return _unique(["-".join(_idval(v, n, k) for v, n in zip(vals, names)) for k, vals in enumerate(rows)])
    if isinstance(ids_node, ast.Name) and ids_node.id in ("str", "repr"):
        fn = {"str": str, "repr": repr}[ids_node.id]
        if any(v is _OPAQUE for vals in rows for v in vals):
            raise Unsupported(ast.unparse(ids_node))
        return _unique(["-".join(_escape(fn(v)) for v in vals) for vals in rows])
    explicit = _value(ids_node)
    if (
        not isinstance(explicit, (list, tuple))
        or not all(isinstance(i, str) for i in explicit)
        or len(explicit) != len(rows)
    ):
        raise Unsupported(ast.unparse(ids_node))
    return _unique([_escape(i) for i in explicit])


def _decorators(func: ast.FunctionDef, suffix: str) -> list[ast.Call]:
    return [d for d in func.decorator_list if isinstance(d, ast.Call) and ast.unparse(d.func).endswith(suffix)]


class SourceFile:
    def __init__(self, path: Path):
        self.source = path.read_text()
        tree = ast.parse(self.source)
        self.functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.assigns = {}
        for n in tree.body:
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                self.assigns[n.targets[0].id] = n.value

    def ids(self, name: str) -> set[str] | None:
        """Every parametrized id of test ``name`` (None if it is not parametrized)."""
        calls = _decorators(self.functions[name], "mark.parametrize")
        if not calls:
            return None
        # the decorator nearest the function is applied first and comes first in the id
        parts = [_parametrize_ids(c, self.assigns) for c in reversed(calls)]
        return {"-".join(p) for p in itertools.product(*parts)}


_FILES: dict[Path, SourceFile] = {}


def _test_file(path: Path) -> SourceFile:
    if path not in _FILES:
        _FILES[path] = SourceFile(path)
    return _FILES[path]


def node_problem(node_id: str) -> str | None:
    """Why ``node_id`` is not a test of this repository, or None when it is."""
    m = re.fullmatch(r"(tests/[\w/]+\.py)::(\w+)(?:\[(.*)\])?", node_id)
    if not m:
        return f"{node_id!r} is not of the form tests/<file>.py::<test>[<id>]"
    path, name, param = ROOT / m[1], m[2], m[3]
    if not path.is_file():
        return f"{m[1]} does not exist"
    f = _test_file(path)
    if not name.startswith("test") or name not in f.functions:
        return f"{m[1]} has no test function {name}"
    if param is None:
        return None
    try:
        ids = f.ids(name)
    except Unsupported as e:
        return f"{node_id}: cannot resolve the parametrized ids statically ({e}); cite the test without an id"
    if ids is None:
        return f"{node_id}: {name} is not parametrized"
    if param not in ids:
        return f"{node_id}: no such id; {name} has {len(ids)} ids, e.g. {sorted(ids)[:8]}"
    return None


# -- message texts ---------------------------------------------------------------------------
def _library_source() -> str:
    files = sorted((ROOT / "lora_ext").rglob("*.py"))
    files += sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh"))
    return "\n".join(p.read_text() for p in files)


def _regex_forms(text: str) -> set[str]:
    """How a test may spell ``text``: as is, or as a regex (escaped, with or without its dots),
    inside a raw or a plain string literal."""

    def esc(t, chars):
        return "".join("\\" + c if c in chars else c for c in t)

    forms = {text, esc(text, "\\^$*+?{}[]()|."), esc(text, "\\^$*+?{}[]()|")}
    return forms | {f.replace("\\", "\\\\") for f in forms}


@pytest.fixture(scope="module")
def doc_text():
    return DOC.read_text()


@pytest.fixture(scope="module")
def rows(doc_text):
    return parse_table(doc_text)


def test_census_has_enough_distinct_rows_grouped_by_area(rows):
    assert len(rows) >= MIN_ROWS, f"docs/errors.md has {len(rows)} rows, expected at least {MIN_ROWS}"
    bad = [r.where() for r in rows if r.area not in AREAS]
    assert not bad, f"areas must be one of {AREAS}: {bad}"
    blocks = [a for a, _ in itertools.groupby(r.area for r in rows)]
    assert len(blocks) == len(set(blocks)), f"rows of one area must stay together: {blocks}"
    seen = set()
    for r in rows:
        key = (r.area, r.bad_input)
        assert key not in seen, f"{r.where()}: listed twice"
        seen.add(key)
        assert r.types and r.texts and r.node_ids, (
            f"{r.where()}: needs an error type ({sorted(ERROR_TYPES)}), a quoted message text and a test"
        )


def test_every_cited_test_exists(rows, doc_text):
    problems = [f"{r.where()}: {p}" for r in rows for n in r.node_ids if (p := node_problem(n))]
    problems += [f"known gap {n}: {p}" for n, _ in known_gaps(doc_text) if (p := node_problem(n))]
    problems += [f"{r.where()}: {f} does not exist" for r in rows for f in r.files if not (ROOT / f).is_file()]
    assert not problems, "\n".join(problems)


def test_every_quoted_message_occurs_in_the_test_or_the_library(rows):
    library = _library_source()
    problems = []
    for r in rows:
        tests = "\n".join(
            (ROOT / p).read_text()
            for p in {n.split("::")[0] for n in r.node_ids} | set(r.files)
            if (ROOT / p).is_file()
        )
        for text in r.texts:
            if text not in library and not any(f in tests for f in _regex_forms(text)):
                problems.append(f"{r.where()}: {text!r} is in neither the tests nor the library")
        for t in r.types:  # the tests name the exception (or warning) they expect
            if t not in ("no error", "UserWarning") and t.split("::")[-1] not in tests:
                problems.append(f"{r.where()}: the tests never mention {t}")
    assert not problems, "\n".join(problems)


def test_known_gaps_are_strict_xfails(doc_text):
    gaps = known_gaps(doc_text)
    problems = []
    for node_id, files in gaps:
        path, name = re.fullmatch(r"(tests/[\w/]+\.py)::(\w+)(?:\[.*\])?", node_id).groups()
        func = _test_file(ROOT / path).functions.get(name)
        marks = _decorators(func, "mark.xfail") if func is not None else []
        strict = any(k.arg == "strict" and _value(k.value) is True for m in marks for k in m.keywords)
        if files:  # a check inside a compiled test program
            if not all("xfail(" in (ROOT / f).read_text() for f in files):
                problems.append(f"{node_id}: {files} hold no xfail(...) check")
        elif not strict:
            problems.append(f"{node_id}: not marked pytest.mark.xfail(strict=True)")
    assert not problems, "\n".join(problems)


def test_static_ids_follow_pytest():
    """The static reader reproduces pytest's ids for the forms the census cites."""
    assert _escape("a\\b") == "a\\\\b" and _escape("tab\there") == "tab\\there" and _escape("x\x00") == "x\\x00"
    f = _test_file(ROOT / "tests" / "test_errors.py")
    assert "in mismatch x-autograd" in f.ids("test_lora_linear_bad_input")
    assert f.ids("test_merge_bad_input") >= {"rank 0-merge_", "scale inf-unmerge_"}
    assert _unique(["a", "b", "a", "x1", "x1"]) == ["a0", "b", "a1", "x1_0", "x1_1"]
