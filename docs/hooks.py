"""MkDocs hooks: the benchmark results shown on the site are the README's.

``benchmarks/report.py`` rewrites the README between its benchmark markers
after every run, so the site includes that part instead of keeping a copy
that would go stale, and publishes the chart it links to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
PLACEHOLDER = "<!-- readme:benchmarks -->"
# The README links the chart by its path in the repository; the site keeps
# that path so the included text needs no rewriting.
CHART = "benchmarks/results/host.png"


def readme_benchmarks() -> str:
    text = README.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {START} ... {END} section")
    return text[start + len(START) : end].strip()


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, CHART, abs_src_path=str(ROOT / CHART)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if PLACEHOLDER in markdown:
        markdown = markdown.replace(PLACEHOLDER, readme_benchmarks())
    return markdown
