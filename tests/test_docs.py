"""Every documentation citation in the repository points at a file in the repository.

Code, configs, notebooks, README and the docs themselves cite the project's documents by file name and
section, e.g. "docs/sifa.md §3" or "docs/architecture.md". This test finds every such citation and checks
that the file resolves inside the checkout (relative to the repository root, or to the citing file's
folder as Markdown links do) and that each cited section number is a heading of that file. A citation
of a document outside the checkout (say, one that only exists next to it on a developer's machine) fails.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The documents that code cites; a citation is any path ending in one of these names.
DOC_NAMES = (
    "sifa",
    "repflow",
    "synthetic_motion",
    "architecture",
    "data",
    "cli",
    "training",
    "kernels",
    "reliability",
    "benchmarks",
    "scale",
    "DESIGN",
)
#: The files the docs must provide (their section numbers are what code and the README cite).
REQUIRED_DOCS = (
    "sifa.md",
    "repflow.md",
    "synthetic_motion.md",
    "architecture.md",
    "data.md",
    "cli.md",
    "training.md",
    "kernels.md",
    "reliability.md",
    "benchmarks.md",
    "scale.md",
)

_SECTION = r"\d+(?:\.\d+)*"
# A path (optionally with folders) ending in a document name, not inside a longer word or a URL, then an
# optional "§N" or "§N–M" (comma and spaces allowed between the name and the section sign).
CITATION = re.compile(
    r"(?<![\w./-])(?P<path>(?:[\w.-]+/)*(?:" + "|".join(DOC_NAMES) + r")\.md)(?![\w])"
    r"(?:[ \t]*,?[ \t]*§[ \t]*(?P<start>" + _SECTION + r")(?:[ \t]*[–-][ \t]*(?P<end>" + _SECTION + r"))?)?"
)
# A Markdown heading whose text starts with a section number: "## 2. The block", "### 2.3 Pairs", "## §5".
HEADING = re.compile(r"^#{1,6}[ \t]+(?:§[ \t]*)?(?P<number>" + _SECTION + r")\.?(?:[ \t]|$)")

SCANNED_SUFFIXES = {".py", ".cu", ".cuh", ".h", ".yaml", ".yml", ".ipynb", ".md", ".toml", ".sh", ".cfg", ".txt"}
SCANNED_NAMES = {"Makefile"}
#: Folders never scanned: environments, caches, build and run outputs.
SKIPPED_DIRS = {"__pycache__", "node_modules", "build", "dist", "runs", "lightning_logs", "venv"}
#: Hidden folders that are part of the project (others, such as .git and .venv, are skipped).
SCANNED_HIDDEN_DIRS = {".ci", ".github"}
#: This file holds the pattern and examples of bad citations on purpose.
SELF = Path(__file__).resolve()


@dataclass(frozen=True)
class Citation:
    file: Path  # the citing file
    line: int
    path: str  # as written
    sections: tuple[str, ...]  # "3", "2.1"; both ends of a range


def find_citations(text: str, file: Path = REPO_ROOT / "x") -> list[Citation]:
    """Every citation in ``text`` (the contents of ``file``), with its 1-based line number."""
    out = []
    for m in CITATION.finditer(text):
        sections = tuple(s for s in (m.group("start"), m.group("end")) if s)
        out.append(Citation(file, text.count("\n", 0, m.start()) + 1, m.group("path"), sections))
    return out


def headings(doc: Path) -> set[str]:
    """Section numbers of the Markdown headings of ``doc`` (headings inside fenced code do not count)."""
    numbers, fenced = set(), False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            numbers.add(m.group("number"))
    return numbers


def resolve(citation: Citation) -> Path | None:
    """The cited file inside the repository (root-relative, or relative to the citing file), else None."""
    for base in (REPO_ROOT, citation.file.parent):
        target = (base / citation.path).resolve()
        if target.is_file() and target.is_relative_to(REPO_ROOT):
            return target
    return None


def problems(citations: list[Citation]) -> list[str]:
    """One message per citation whose file is not in the repository or whose section is not a heading."""
    out = []
    for c in citations:
        where = f"{c.file.relative_to(REPO_ROOT) if c.file.is_relative_to(REPO_ROOT) else c.file}:{c.line}"
        target = resolve(c)
        if target is None:
            out.append(f"{where}: cites {c.path!r}, which is not a file in the repository")
            continue
        missing = [s for s in c.sections if s not in headings(target)]
        if missing:
            rel = target.relative_to(REPO_ROOT)
            out.append(f"{where}: cites {c.path} §{', §'.join(missing)}, but {rel} has no such section heading")
    return out


def scanned_files(root: Path = REPO_ROOT) -> list[Path]:
    """The project's text files (code, configs, notebooks, docs), without environments and caches."""
    out = []
    stack = [root]
    while stack:
        folder = stack.pop()
        for p in sorted(folder.iterdir()):
            if p.is_dir():
                hidden = p.name.startswith(".") and p.name not in SCANNED_HIDDEN_DIRS
                if not (hidden or p.name in SKIPPED_DIRS or p.name.endswith(".egg-info")):
                    stack.append(p)
            elif (p.suffix in SCANNED_SUFFIXES or p.name in SCANNED_NAMES or folder.name == ".ci") and p != SELF:
                out.append(p)
    return out


def file_text(path: Path) -> str:
    """The text a reader sees: a notebook's cell sources joined (JSON escapes undone), else the file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".ipynb":
        cells = json.loads(text).get("cells", [])
        return "\n".join("".join(c.get("source", [])) for c in cells)
    return text


def all_citations() -> list[Citation]:
    return [c for path in scanned_files() for c in find_citations(file_text(path), path)]


# ------------------------------------------------------------------------------------------ the checker


def test_citation_pattern_finds_paths_sections_and_ranges():
    text = (
        "see docs/sifa.md §3 and docs/repflow.md, §2.1; sifa.md §1–2\n"
        "old: ../shared/specs/synthetic_motion.md and DESIGN.md; not metadata.md nor https://x.org/docs/data.md"
    )
    found = [(c.line, c.path, c.sections) for c in find_citations(text)]
    assert found == [
        (1, "docs/sifa.md", ("3",)),
        (1, "docs/repflow.md", ("2.1",)),
        (1, "sifa.md", ("1", "2")),
        (2, "../shared/specs/synthetic_motion.md", ()),
        (2, "DESIGN.md", ()),
    ]


def test_checker_rejects_files_outside_the_repo_and_missing_sections():
    here = REPO_ROOT / "ops" / "example.py"
    bad = find_citations("a ../shared/specs/sifa.md §1, b sifa.md §3, c docs/sifa.md §9, d docs/sifa.md §3", here)
    found = problems(bad)
    assert len(found) == 3, found
    assert "not a file in the repository" in found[0] and "not a file in the repository" in found[1]
    assert "§9" in found[2] and "no such section heading" in found[2]


def test_headings_ignore_fenced_code(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("# Title\n## 1. One\n```\n## 2. Not a heading\n```\n### 1.1 Sub\n## §5 Five\n", encoding="utf-8")
    assert headings(doc) == {"1", "1.1", "5"}


# ------------------------------------------------------------------------------------------ the repo


def test_docs_exist_with_the_cited_section_numbers():
    docs = REPO_ROOT / "docs"
    for name in REQUIRED_DOCS:
        assert (docs / name).is_file(), f"docs/{name} is missing"
    # Code cites the specs' numbering, so these must stay stable.
    assert {"1", "2", "2.1", "2.2", "2.3", "2.4", "3", "5"} <= headings(docs / "sifa.md")
    assert {"1", "2", "3", "4", "5"} <= headings(docs / "repflow.md")


def test_every_doc_citation_resolves_inside_the_repo():
    citations = all_citations()
    assert len(citations) >= 20, "the scanner found suspiciously few citations"
    found = problems(citations)
    assert not found, f"{len(found)} unresolved doc citations:\n" + "\n".join(found)


#: A Markdown link or image: [text](target) or ![alt](target); the target up to a space, ')' or '#'.
MARKDOWN_LINK = re.compile(r"!?\[[^\]\n]*\]\((?P<target>[^)\s#]+)(?:#[^)\s]*)?\)")


def markdown_link_problems(text: str, doc: Path) -> list[str]:
    """One message per relative link in ``text`` (the contents of ``doc``) whose target is not a file or
    folder inside the repository; links with a scheme (https:, mailto:) are not checked."""
    out = []
    for m in MARKDOWN_LINK.finditer(text):
        target = m.group("target")
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):
            continue
        path = (doc.parent / target).resolve()
        if not (path.exists() and path.is_relative_to(REPO_ROOT)):
            line = text.count("\n", 0, m.start()) + 1
            out.append(f"{doc.relative_to(REPO_ROOT)}:{line}: links {target!r}, which is not in the repository")
    return out


def test_markdown_link_checker_flags_missing_and_outside_targets():
    doc = REPO_ROOT / "docs" / "example.md"  # never written: only its folder matters
    text = "[a](cli.md) [b](missing.md#s)\n[c](https://example.org/x.md) ![d](../README.md) [e](../../outside.md)"
    found = markdown_link_problems(text, doc)
    assert len(found) == 2, found
    assert found[0].startswith("docs/example.md:1: links 'missing.md'")
    assert found[1].startswith("docs/example.md:2: links '../../outside.md'")


def test_readme_and_docs_links_resolve():
    docs = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    found = [p for doc in docs for p in markdown_link_problems(doc.read_text(encoding="utf-8"), doc)]
    assert not found, "\n".join(found)
