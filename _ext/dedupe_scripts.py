"""Drop repeated inline <script> tags from every page.

Under Sphinx 7, the inline scripts that sphinx-thebe and sphinx-togglebutton add once are written
twice into each page; thebe's declares `const THEBE_JS_URL`, so the second copy is a console error
("Identifier 'THEBE_JS_URL' has already been declared") on every page. tests/test_browser.py checks
that pages load without console errors.
"""


def dedupe(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for js in context.get("script_files", []):
        key = (str(getattr(js, "filename", js) or ""), tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"] = kept


def setup(app):
    app.connect("html-page-context", dedupe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
