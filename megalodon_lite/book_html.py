"""The executed book as HTML pages that work offline, with the navigation a book has.

nbconvert's lab template loads MathJax, require.js, mermaid and the widget manager from CDNs, so
offline every equation shows as raw ``$$…$$`` and a widget shows nothing. Here:

- Maths is converted to MathML when the page is built (``latex2mathml``); browsers draw MathML
  themselves (Chromium 109+, Firefox, Safari), so a page needs no script and no network.
- A widget cannot run without a kernel: its output becomes a still (the PNGs of its image
  widgets, the text of its HTML widgets and its controls' values, read from the widget state that
  nbclient saved) under a line saying that it is live in JupyterLab.
- Every page has previous / contents / next links at its top and bottom and a ``<title>`` naming
  its chapter; ``index.html`` lists the chapters, one line each.
- No page refers to anything outside the book's folder (the template's CDN blocks are emptied).
"""

from __future__ import annotations

import functools
import html
import re
from dataclasses import dataclass
from pathlib import Path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
BOOK_NAME = "megalodon-lite"
WIDGET_NOTE = ("Interactive widget: it is live in JupyterLab (open this chapter there and run it to move "
               "its controls). Below, a still of it as the book build left it.")
CONTAINERS = {"VBoxModel", "HBoxModel", "BoxModel", "GridBoxModel", "AccordionModel", "TabModel", "StackModel"}
TEXT_WIDGETS = {"HTMLModel", "HTMLMathModel", "LabelModel"}

BOOK_CSS = """
nav.book-nav { display: flex; justify-content: space-between; gap: 1em; max-width: 60em;
  margin: 1em auto; padding: .5em 1em; font-family: var(--jp-ui-font-family, sans-serif);
  border-bottom: 1px solid #ddd; }
nav.book-nav.bottom { border-bottom: none; border-top: 1px solid #ddd; }
nav.book-nav a { text-decoration: none; }
nav.book-nav span { min-width: 10em; }
math[display="block"] { margin: .6em 0; overflow-x: auto; }
mtd[columnalign="right"] { text-align: right; }  /* MathML Core ignores columnalign; CSS does not */
mtd[columnalign="left"] { text-align: left; }
mtd { padding: 0 .15em; }
.book-widget-still { border: 1px dashed #999; padding: .6em; border-radius: 4px; }
.book-widget-note { font-style: italic; margin: 0 0 .5em 0; }
.book-widget-controls { font-family: var(--jp-code-font-family, monospace); margin: .3em 0; }
.book-math-fallback { color: #a00; }
"""

# Extends nbconvert's lab page: the blocks that load scripts from CDNs are emptied, and the book's
# navigation goes around the notebook.
PAGE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}<style type="text/css">{{ resources.book_css }}</style>{%- endblock extra_css -%}
{%- block body_header -%}
{{ super() }}
{{ resources.book_nav_top }}
{%- endblock body_header -%}
{%- block body_footer -%}
{{ resources.book_nav_bottom }}
{{ super() }}
{%- endblock body_footer -%}
"""


@dataclass(frozen=True)
class PageLink:
    """A link to another page of the book."""

    href: str
    title: str


def nav_html(previous: PageLink | None, following: PageLink | None, *, position: str) -> str:
    """Previous / contents / next links (``position`` is ``"top"`` or ``"bottom"``)."""
    def link(target: PageLink | None, rel: str, text: str) -> str:
        if target is None:
            return "<span></span>"
        return f'<a rel="{rel}" href="{html.escape(target.href)}">{text}</a>'

    return (f'<nav class="book-nav {position}" aria-label="chapters">'
            + link(previous, "prev", f"← {html.escape(previous.title) if previous else ''}")
            + '<a rel="contents" href="index.html">Contents</a>'
            + link(following, "next", f"{html.escape(following.title) if following else ''} →")
            + "</nav>")


# TeX operator names latex2mathml passes through as raw text; written as \operatorname they render.
_OPERATOR_NAMES = ("arg", "deg", "det", "dim", "gcd", "hom", "ker", "Pr", "sup", "inf", "lg")
_RAW_COMMAND = re.compile(r">[^<]*\\[A-Za-z]+[^<]*<")  # a "\name" left in a MathML text node


def tex_to_mathml(tex: str, *, display: bool) -> str:
    """MathML for a LaTeX formula; if the converter cannot read it, the TeX source in red.

    A formula that fails (the converter raises, or leaves a TeX command as text) is recorded in
    :data:`MATH_FAILURES`, which the book build reports.
    """
    from latex2mathml.converter import convert

    for name in _OPERATOR_NAMES:
        tex = re.sub(rf"\\{name}(?![A-Za-z])", rf"\\operatorname{{{name}}}", tex)
    # latex2mathml reads align* but not aligned (the same rows of right/left column pairs)
    tex = re.sub(r"\\(begin|end)\{aligned\}", r"\\\1{align*}", tex)
    try:
        mathml = convert(tex, display="block" if display else "inline")
        if _RAW_COMMAND.search(mathml):
            raise ValueError(f"unsupported command {_RAW_COMMAND.search(mathml).group(0)[1:-1]!r}")
        if "<mi>&</mi>" in mathml:
            raise ValueError("an alignment '&' outside an environment the converter reads")
        return mathml
    except Exception as err:  # latex2mathml raises its own exception types for unsupported TeX
        MATH_FAILURES.append(f"{tex!r}: {type(err).__name__}: {err}")
        return f'<code class="book-math-fallback" title="not converted">{html.escape(tex)}</code>'


MATH_FAILURES: list[str] = []


@functools.cache
def _exporter_class():
    """The exporter, built on first use (nbconvert is in the ``[book]`` extra, not a core dependency)."""
    import jinja2
    from nbconvert import HTMLExporter
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    class MathMLRenderer(IPythonRenderer):
        """nbconvert's markdown renderer, with maths written as MathML instead of left for MathJax."""

        def block_math(self, body: str) -> str:
            return tex_to_mathml(body, display=True)

        def inline_math(self, body: str) -> str:
            return tex_to_mathml(body, display=False)

        def latex_environment(self, name: str, body: str) -> str:
            return tex_to_mathml(f"\\begin{{{name}}}{body}\\end{{{name}}}", display=True)

    class BookExporter(HTMLExporter):
        """HTML pages with MathML maths, no CDN scripts and the book's navigation."""

        def __init__(self, **kw):
            kw.setdefault("extra_loaders", [jinja2.DictLoader({"megalodon_book.html.j2": PAGE_TEMPLATE})])
            super().__init__(template_name="lab", **kw)
            self.template_file = "megalodon_book.html.j2"

        @jinja2.pass_context
        def markdown2html(self, context, source):  # same as HTMLExporter's, with the MathML renderer
            cell = context.get("cell", {})
            renderer = MathMLRenderer(
                escape=False,
                attachments=cell.get("attachments", {}),
                embed_images=self.embed_images,
                path=context.get("resources", {}).get("metadata", {}).get("path", ""),
                anchor_link_text=self.anchor_link_text,
                exclude_anchor_links=self.exclude_anchor_links,
                **self.lexer_options,
            )
            return MarkdownWithMath(renderer=renderer).render(source)

    return BookExporter


def _still(model_id: str, state: dict, depth: int = 0) -> list[str]:
    """HTML pieces showing one widget (and its children) as saved in the notebook's widget state."""
    model = state.get(model_id)
    if model is None or depth > 20:
        return []
    name, values = model.get("model_name", ""), model.get("state", {})
    if name in CONTAINERS:
        pieces = []
        for child in values.get("children", []):
            pieces += _still(str(child).removeprefix("IPY_MODEL_"), state, depth + 1)
        return pieces
    if name == "ImageModel":
        for buffer in model.get("buffers", []):
            if buffer.get("path") == ["value"] and buffer.get("encoding", "base64") == "base64":
                image_format = html.escape(values.get("format", "png"))
                return [f'<img alt="{html.escape(values.get("description", "") or "widget image")}" '
                        f'src="data:image/{image_format};base64,{buffer["data"]}">']
        return []
    if name in TEXT_WIDGETS:
        value = values.get("value", "")
        return [f"<div>{value if name != 'LabelModel' else html.escape(value)}</div>"] if value else []
    if "description" in values and ("value" in values or "index" in values):
        value = values.get("value")
        labels = values.get("_options_labels")
        if labels is not None and isinstance(values.get("index"), int):
            value = labels[values["index"]]
        return [f'<span class="book-widget-control">{html.escape(str(values["description"]))} = '
                f'{html.escape(str(value))}</span>']
    return []


def freeze_widgets(notebook) -> int:
    """Replace every widget output by a still of it (see the module docstring); return how many.

    Also drops the notebook's saved widget state, so the page does not try to load a widget
    manager from the internet.
    """
    saved = notebook.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    count = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW not in data:
                continue
            pieces = _still(data[WIDGET_VIEW].get("model_id", ""), saved)
            controls = [p for p in pieces if p.startswith('<span class="book-widget-control">')]
            others = [p for p in pieces if p not in controls]
            body = (f'<div class="book-widget-controls">{" · ".join(controls)}</div>' if controls else "")
            body += "".join(others) or "<div>(no picture of this widget was saved)</div>"
            output["data"] = {"text/html": (f'<div class="book-widget-still"><p class="book-widget-note">'
                                            f"{WIDGET_NOTE}</p>{body}</div>")}
            count += 1
    return count


def label_solutions(notebook) -> int:
    """In markdown cells, show a solution region's markers as a "Solution." label; return how many.

    (In code cells the markers are comments and stay: they show which lines the student edition
    replaces.)
    """
    from megalodon_lite.student import BEGIN_SOLUTION, END_SOLUTION

    count = 0
    for cell in notebook.cells:
        if cell.cell_type != "markdown" or BEGIN_SOLUTION not in cell.source:
            continue
        lines = []
        for line in cell.source.split("\n"):
            if BEGIN_SOLUTION in line:
                lines.append("**Solution.**")
                count += 1
            elif END_SOLUTION not in line:
                lines.append(line)
        cell.source = "\n".join(lines)
    return count


def render_page(notebook, target: Path, *, title: str, previous: PageLink | None,
                following: PageLink | None) -> Path:
    """Write one executed chapter as ``target`` (an offline page with the book's navigation)."""
    freeze_widgets(notebook)
    label_solutions(notebook)
    notebook.metadata["title"] = f"{title} · {BOOK_NAME}"
    exporter = _exporter_class()()
    resources = {
        "metadata": {"name": title, "path": str(target.parent)},
        "book_css": BOOK_CSS,
        "book_nav_top": nav_html(previous, following, position="top"),
        "book_nav_bottom": nav_html(previous, following, position="bottom"),
    }
    body, _ = exporter.from_notebook_node(notebook, resources=resources)
    target.write_text(body, encoding="utf-8")
    return target


def index_page(rows: list[tuple[PageLink, str, str | None]], *, subtitle: str) -> str:
    """The contents page: one line per chapter (link, status line, error text or None)."""
    items = []
    for link, status, error in rows:
        detail = "" if error is None else f"<pre>{html.escape(error)}</pre>"
        items.append(f'<li><a href="{html.escape(link.href)}">{html.escape(link.title)}</a> '
                     f"<small>({html.escape(status)})</small>{detail}</li>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>Contents · {BOOK_NAME}</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto;padding:0 1em}} pre{{color:#a00}}
ul{{list-style:none;padding:0}} li{{margin:.4em 0}}</style></head>
<body><h1>{BOOK_NAME}</h1>
<p>Megalodon, built chapter by chapter. {html.escape(subtitle)}</p>
<ul>
{chr(10).join(items)}
</ul></body></html>
"""

