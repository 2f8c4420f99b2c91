"""The documentation cannot rot: every ```python block of README.md, CONTRIBUTING.md and docs/*.md runs.

How (CONTRIBUTING.md, "Documentation"):
- The blocks of one page run in order in one namespace (a page sets up ``model`` once and later blocks use it), in a
  subprocess per page (``python -P tests/test_docs.py PAGE``: this file is also the runner), one thread, in a
  fresh temporary folder as the working directory, with ``torch.manual_seed(0)``. The deprecated flat module
  paths (``lora_ext.gguf_model``, ...) are errors there: the docs teach the subpackage paths.
- A block right after ``<!-- docs-test: skip (REASON) -->`` is not run; REASON must be one of ``SKIP_REASONS``.
- A failure names the page, the block's number and line, and shows the traceback with the page's own line
  numbers (each block is compiled with the page as its file name, at its line).
- Every fence names its language from ``LANGUAGES``, so a Python block cannot hide in an unlabelled fence.
- Relative links ``[text](path#anchor)`` point to files that exist, and to headings that exist in Markdown files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python"}
LANGUAGES = PYTHON | {"bash", "cmake", "cpp", "text"}
#: why a Python block may be left out; anything else is run
SKIP_REASONS = {
    "needs a GPU",
    "several processes",
    "downloads a model",
    "needs the main job's output",
    "compiles for minutes",
}
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
SKIP = re.compile(r"^skip \((.+)\)$")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
PER_PAGE_TIMEOUT_S = 300


@dataclass
class Block:
    page: Path
    index: int  # 1-based, among the page's fenced blocks of any language
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    marker: str | None  # the docs-test marker right before the fence, if any

    @property
    def skip_reason(self) -> str | None:
        m = SKIP.match(self.marker or "")
        return m.group(1) if m else None

    def where(self) -> str:
        try:
            page = self.page.relative_to(ROOT)
        except ValueError:
            page = self.page
        return f"{page} block {self.index} (line {self.line})"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, with the docs-test marker on the last non-blank line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(prev)
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = [ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]]
        out.append(Block(page, len(out) + 1, i + 2, lang, "\n".join(body) + "\n", marker.group(1) if marker else None))
        i = j + 1
    return out


def run_page(page: Path) -> int:
    """Run ``page``'s Python blocks in order in one namespace (the subprocess side). Returns the exit status."""
    import warnings

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    # The flat layout's module paths still import with a DeprecationWarning; the docs must not use them.
    warnings.filterwarnings("error", message=r"lora_ext\.\S+ moved to", category=DeprecationWarning)
    namespace = {"__name__": "__docs__"}
    ran = 0
    for block in blocks(page):
        if block.lang not in PYTHON or block.skip_reason:
            continue
        start = time.perf_counter()
        # padded so that tracebacks (and linecache, which reads the page) show the page's own line numbers
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        try:
            exec(code, namespace)
        except BaseException:  # noqa: BLE001 - SystemExit from a block is a failure too
            print(f"docs-test: FAILED {block.where()}", flush=True)
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
            return 1
        ran += 1
        print(f"docs-test: ok {block.where()} {time.perf_counter() - start:.1f} s", flush=True)
    print(f"docs-test: {page.name}: {ran} blocks ran", flush=True)
    return 0


def run_page_subprocess(page: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-P", str(Path(__file__).resolve()), str(page)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=PER_PAGE_TIMEOUT_S,
    )


# ----------------------------------------------------------------------------------------------- the tests
RUNNABLE = [p for p in PAGES if p.exists() and any(b.lang in PYTHON and not b.skip_reason for b in blocks(p))]


@pytest.fixture(scope="module")
def page_runs(request, tmp_path_factory):
    """The selected pages' subprocesses, started together (as many at once as there are CPUs): page -> Future."""
    pages = [
        item.callspec.params["page"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_python_blocks_run"
    ]
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))
    runs = {page: pool.submit(run_page_subprocess, page, tmp_path_factory.mktemp(page.stem)) for page in pages}
    pool.shutdown(wait=False)
    return runs


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, page_runs):
    r = page_runs[page].result()
    if r.returncode != 0:
        pytest.fail(
            f"a Python block of {page.relative_to(ROOT)} failed (exit {r.returncode}):\n"
            f"{r.stdout[-8000:]}\n{r.stderr[-4000:]}",
            pytrace=False,
        )


def test_every_fence_names_a_known_language():
    bad = [f"{b.where()}: ```{b.lang}" for p in PAGES if p.exists() for b in blocks(p) if b.lang not in LANGUAGES]
    assert not bad, f"fences must name one of {sorted(LANGUAGES)}:\n" + "\n".join(bad)


def test_every_skip_names_an_allowed_reason():
    bad = []
    for page in (p for p in PAGES if p.exists()):
        lines = page.read_text(encoding="utf-8").splitlines()
        for k, line in enumerate(lines, 1):
            m = MARKER.match(line)
            s = SKIP.match(m.group(1)) if m else None
            if m and (not s or s.group(1) not in SKIP_REASONS):
                bad.append(
                    f"{page.relative_to(ROOT)}:{k}: {line.strip()}: expected skip (REASON), REASON one of "
                    f"{sorted(SKIP_REASONS)}"
                )
        marked = [b for b in blocks(page) if b.marker]
        bad += [
            f"{b.where()}: a docs-test marker before a ```{b.lang} block (only Python runs)"
            for b in marked
            if b.lang not in PYTHON
        ]
        stray = sum(1 for line in lines if MARKER.match(line)) - len(marked)
        if stray:
            bad.append(f"{page.relative_to(ROOT)}: {stray} docs-test marker(s) not right before a fence")
    assert not bad, "\n".join(bad)


def _prose(page: Path):
    """(line number, line) for every line outside fenced blocks."""
    in_code = False
    for k, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            yield k, line


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation other than - and _ dropped, spaces to -."""
    return {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for _, line in _prose(page)
        if line.startswith("#")
    }


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target), on one line


def _links(page: Path):
    for k, line in _prose(page):
        for m in LINK.finditer(re.sub(r"`[^`]*`", "", line)):  # code spans are not links
            yield k, m.group(1)


def test_relative_links_point_to_existing_files_and_headings():
    bad = []
    for page in (p for p in PAGES if p.exists()):
        for k, target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{k}: ({target})"
            if not dest.exists():
                bad.append(f"{where} no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{where} no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, "broken relative links:\n" + "\n".join(bad)


GENERATED = {"lora_ext/_build_info.py"}  # written by the build (cmake/_build_info.py.in), not in the source tree


def test_architecture_page_names_every_module_folder_and_script():
    """docs/architecture.md matches the tree: every module of lora_ext/ and dev/lora_ext_dev/, folder of csrc/ and
    file of scripts/ and cmake/ is named (in code font), and every such path it names exists."""
    spans = {s for _, line in _prose(ROOT / "docs" / "architecture.md") for s in re.findall(r"`([^`]+)`", line)}
    missing = []
    for path in sorted((ROOT / "lora_ext").rglob("*.py")):
        rel = path.relative_to(ROOT / "lora_ext").as_posix()
        if rel.endswith("/__init__.py"):
            rel = rel[: -len("__init__.py")]  # a subpackage is named by its folder
        if rel not in spans and f"lora_ext/{rel}" not in spans:
            missing.append(f"lora_ext/{rel}")
    for folder in sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_dir()):
        rel = folder.relative_to(ROOT).as_posix() + "/"
        if not any(s.startswith(rel) for s in spans):
            missing.append(rel)
    for top in ("scripts", "cmake", "dev/lora_ext_dev"):
        missing += [
            f"{top}/{p.name}"
            for p in sorted((ROOT / top).iterdir())
            if p.name != "__pycache__" and f"{top}/{p.name}" not in spans
        ]
    stale = [
        s
        for s in sorted(spans)
        if re.match(r"^(csrc|scripts|cmake|lora_ext|dev)/[\w./-]*$", s)
        and not (ROOT / s).exists()
        and s not in GENERATED
    ]
    assert not missing and not stale, (
        f"docs/architecture.md does not match the tree: add {missing} to it, and remove or fix {stale}"
    )


def test_readme_is_short_and_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "README.md: at most 250 lines; move details into docs/"
    # .ci/run runs "the README's test command"; the first command is the main job
    assert "bash scripts/run.sh -m pytest tests -q" in text
    assert "bash scripts/run.sh examples/finetune_llm.py" in text


FAILING_PAGE = """# a page

```python
x = 41
```

<!-- docs-test: skip (needs a GPU) -->
```python
raise AssertionError("a skipped block ran")
```

Text between the blocks.

```python
y = x + 1
assert y == 42
z = y / 0
```
"""


def test_a_failing_block_fails_with_its_page_line_and_traceback(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(FAILING_PAGE)
    r = run_page_subprocess(page, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"docs-test: FAILED {page} block 3 (line 15)" in r.stdout, r.stdout + r.stderr
    assert f'File "{page}", line 17' in r.stdout, r.stdout  # the page's own line of `z = y / 0`
    # ZeroDivisionError, not NameError or AssertionError: block 3 saw block 1's x, and the skipped block never ran
    assert "z = y / 0" in r.stdout and "ZeroDivisionError" in r.stdout, r.stdout
    assert "a skipped block ran" not in r.stdout, r.stdout


def test_the_flat_layouts_module_paths_fail_in_the_docs(tmp_path):
    page = tmp_path / "old.md"
    page.write_text("```python\nimport lora_ext.gguf_model\n```\n")
    r = run_page_subprocess(page, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DeprecationWarning: lora_ext.gguf_model moved to lora_ext.quant.gguf" in r.stdout, r.stdout + r.stderr


if __name__ == "__main__":
    sys.exit(run_page(Path(sys.argv[1]).resolve()))
