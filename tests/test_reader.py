"""What a reader of a chapter relies on, checked on the notebooks themselves (no build, no browser).

- Colab: the first code cell, removed from the HTML, installs the package when it is not importable;
  nothing else in a chapter downloads anything or touches Google Drive. Exported cells are library code
  (`from_pretrained` may fetch from the Hub when a user asks it to); the one cell that reaches the Hub on
  purpose (chapter 7's real mamba2-130m, skipped when offline) carries the tag `needs-network`. A chapter that
  reads the committed results files (chapter 8) fetches every one of them in that first cell.
- Every chapter ends with exercises, whose solutions are in collapsed `hide-cell` cells (nbval runs them).
"""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def toc_files(node):
    "Every `file:` of _toc.yml, in order."
    if isinstance(node, dict):
        return ([node["file"]] if "file" in node else []) + [
            f for v in node.values() for f in toc_files(v)
        ]
    return [f for v in node for f in toc_files(v)] if isinstance(node, list) else []


# the chapters of the book: those in the table of contents (a draft notebook not yet listed is not one)
TOC = [
    ROOT / f"{f}.ipynb"
    for f in toc_files(yaml.safe_load((ROOT / "_toc.yml").read_text()))
]
CHAPTERS = [nb for nb in TOC if re.fullmatch(r"\d\d_.+\.ipynb", nb.name)]
PAGES = [nb for nb in TOC if nb.exists()]
INSTALL = "git+https://github.com/mamba2-book/mamba2-derived"
DOWNLOADS = re.compile(
    r"google\.colab|drive\.mount|urlopen|urlretrieve|requests\.get|wget |curl |hf_hub_download|snapshot_download"
    r"|from_pretrained\(\s*[\"'][\w.-]+/[\w.-]+[\"']"
)  # a Hub id, not a local folder


def cells(nb):
    return [
        (c["cell_type"], "".join(c["source"]), c["metadata"].get("tags", []))
        for c in json.loads(nb.read_text())["cells"]
    ]


@pytest.mark.parametrize("nb", PAGES, ids=lambda p: p.name)
def test_colab_install_cell(nb):
    code = [(src, tags) for kind, src, tags in cells(nb) if kind == "code"]
    first, tags = code[0]
    assert "remove-cell" in tags, (
        f"{nb.name}: the first code cell must be the Colab install cell, tagged remove-cell"
    )
    assert (
        re.search(r"^try:\s*\n\s*import mamba2\s*\nexcept ImportError:", first, re.M)
        and INSTALL in first
    ), (
        f"{nb.name}: the first code cell must install {INSTALL} when `import mamba2` fails"
    )
    others = [
        src
        for src, tags in code[1:]
        if "needs-network" not in tags
        and not src.startswith("#| export")
        and (INSTALL in src or DOWNLOADS.search(src))
    ]
    assert not others, (
        f"{nb.name}: cells after the install cell download or mount something: {others}"
    )


@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.name)
def test_chapter_ends_with_exercises(nb):
    cs = cells(nb)
    heads = [
        i
        for i, (kind, src, _) in enumerate(cs)
        if kind == "markdown" and re.search(r"^## Exercises", src, re.M)
    ]
    assert heads, f"{nb.name}: no '## Exercises' section"
    after = cs[heads[-1] + 1 :]
    assert after and all(
        kind == "code" and "hide-cell" in tags for kind, _, tags in after
    ), (
        f"{nb.name}: everything after '## Exercises' must be solution cells tagged hide-cell"
    )
    n_questions = len(
        re.findall(r"^\d+\.", cs[heads[-1]][1].split("## Exercises")[-1], re.M)
    )
    assert n_questions >= 1 and len(after) >= n_questions, (
        f"{nb.name}: {n_questions} exercises, {len(after)} solution cells"
    )


@pytest.mark.parametrize("nb", PAGES, ids=lambda p: p.name)
def test_colab_fetches_every_results_file(nb):
    "A chapter that reads committed results files (`load(...)`) fetches each of them in its Colab cell."
    code = [src for kind, src, _ in cells(nb) if kind == "code"]
    loads = re.findall(r"""\bload\(\s*(f?)["']([^"']+)["']""", "\n".join(code[1:]))
    formatted = [name for f, name in loads if f]
    assert not formatted, (
        f"{nb.name}: name results files literally, not with f-strings: {formatted}"
    )
    read = {name for _, name in loads}
    fetched = set(re.findall(r"""["']([\w.-]+\.json)["']""", code[0]))
    assert read <= fetched, (
        f"{nb.name}: results files read but not fetched for Colab: {sorted(read - fetched)}"
    )


WIDTH = 88  # characters of code that fit the rendered column without scrolling sideways


@pytest.mark.parametrize("nb", PAGES, ids=lambda p: p.name)
def test_code_fits_the_column(nb):
    "No line of a code cell is wider than the page's column: nothing is cut off on the page."
    wide = [
        f"cell {i}: {line[:60]}... ({len(line)})"
        for i, (kind, src, tags) in enumerate(cells(nb))
        if kind == "code" and "remove-cell" not in tags
        for line in src.splitlines()
        if len(line) > WIDTH
    ]
    assert not wide, (
        f"{nb.name}: {len(wide)} code lines over {WIDTH} characters: {wide[:5]}"
    )


CHAPTER_MENTION = re.compile(r"(?<![\[\w`/])[Cc]hapters? \d\b(?![^\[]*\]\()")


@pytest.mark.parametrize("nb", PAGES, ids=lambda p: p.name)
def test_chapter_mentions_are_links(nb):
    "'chapter N' in the prose links to chapter N (headings and a chapter naming itself aside)."
    own = nb.name[:2].lstrip("0")
    plain = []
    for kind, src, _ in cells(nb):
        if kind != "markdown":
            continue
        for line in src.splitlines():
            if line.lstrip().startswith("#"):
                continue
            text = re.sub(r"`[^`]*`|\$[^$]*\$|\[[^\]]*\]\([^)]*\)", "", line)
            plain += [
                m.group(0)
                for m in CHAPTER_MENTION.finditer(text)
                if m.group(0)[-1] != own
            ]
    assert not plain, f"{nb.name}: chapter mentions that are not links: {plain[:5]}"
