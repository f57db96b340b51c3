"""Code cells as a reader should meet them, and names that lead to their definitions.

- The `#| export`, `#| default_exp` lines that nbdev reads stay in the notebooks but are not shown
  on the page: they are instructions to the exporter, not the subject of the cell.
- Each exported function or class gets an anchor on the cell that defines it (`def-NAME`), and
  every inline code span of the book that names it (`ssd_chunked`, or `ssd_chunked(...)`) links
  there, across chapters.
- Solution cells of the exercises (hidden cells whose first line is `# Solution ...`) open with a
  button that says "Show solution", not "Show code cell content".
"""
import re

from docutils import nodes

DIRECTIVE = re.compile(r"^#\|.*\n?", re.M)
DEFINES = re.compile(r"^(?:def|class)\s+([A-Za-z]\w*)", re.M)


def code_cells(doctree):
    "Every notebook code cell of the page with its source block: `(cell container, literal_block)`."
    for cell in doctree.findall(nodes.container):
        if cell.get("nb_element") != "cell_code":
            continue
        for block in cell.findall(nodes.literal_block):
            yield cell, block
            break


def read_cells(app, doctree):
    "Strip nbdev's directives from the shown source; record and anchor what exported cells define."
    env, docname = app.env, app.env.docname
    defined = env.book_definitions = getattr(env, "book_definitions", {})
    for name in [n for n, (doc, _) in defined.items() if doc == docname]:
        del defined[name]                           # a page read again forgets its old names
    for cell, block in code_cells(doctree):
        source = block.astext()
        if not DIRECTIVE.search(source):
            continue
        exported = re.search(r"^#\|\s*export", source, re.M)
        shown = DIRECTIVE.sub("", source).strip("\n")
        block.rawsource = shown
        block.children = [nodes.Text(shown)]
        for name in DEFINES.findall(shown) if exported else []:
            anchor = f"def-{name.lower().replace('_', '-')}"
            cell["ids"].append(anchor)
            defined.setdefault(name, (docname, anchor))
    for cell, _ in code_cells(doctree):
        first = cell.get("cell_metadata", {}).get("tags", [])
        if "hide-cell" in first and re.match(r"#\s*Solution", cell.astext().lstrip()):
            cell["prompt_show"], cell["prompt_hide"] = "Show solution", "Hide solution"


NAME = re.compile(r"^([A-Za-z]\w*)(\(.*\))?$")


def link_names(app, doctree, docname):
    "Turn inline code that names an exported definition into a link to it."
    defined = getattr(app.env, "book_definitions", {})
    for literal in list(doctree.findall(nodes.literal)):
        if isinstance(literal.parent, (nodes.reference, nodes.literal_block)):
            continue
        match = NAME.match(literal.astext())
        target = match and defined.get(match.group(1))
        if not target:
            continue
        todoc, anchor = target
        uri = "" if todoc == docname else app.builder.get_relative_uri(docname, todoc)
        link = nodes.reference("", "", internal=True, refuri=f"{uri}#{anchor}",
                               reftitle=f"{match.group(1)}: where it is defined")
        literal.replace_self(link)
        link.append(literal)


def merge(app, env, docnames, other):
    env.book_definitions = {**getattr(env, "book_definitions", {}),
                            **getattr(other, "book_definitions", {})}


def setup(app):
    app.connect("doctree-read", read_cells)
    app.connect("doctree-resolved", link_names)
    app.connect("env-merge-info", merge)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
