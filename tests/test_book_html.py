"""The book's offline pages, piece by piece: maths to MathML, widget stills, navigation, solutions."""

from __future__ import annotations

import base64

import nbformat
import pytest

from megalodon_lite import book_html


@pytest.fixture(autouse=True)
def no_failures_left_over(monkeypatch):
    monkeypatch.setattr(book_html, "MATH_FAILURES", [])


def test_maths_becomes_mathml_aligned_and_arg_included():
    block = book_html.tex_to_mathml(r"\begin{aligned} x &= \arg c && \text{note}\\ y &= 2 \end{aligned}", display=True)
    assert block.startswith('<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">')
    assert block.count("<mtr>") == 2 and 'columnalign="right"' in block and "<mo>arg</mo>" in block
    assert "&" not in block.replace("&#x", "") and "\\" not in block
    assert book_html.tex_to_mathml(r"\alpha_t", display=False).startswith('<math xmlns="http://www.w3.org/1998/Math/MathML" display="inline">')
    assert book_html.MATH_FAILURES == []


@pytest.mark.parametrize("tex", [r"\notacommand x", r"a & b"])
def test_maths_the_converter_cannot_read_is_shown_as_tex_and_reported(tex):
    shown = book_html.tex_to_mathml(tex, display=True)
    assert shown.startswith('<code class="book-math-fallback"') and "<math" not in shown
    assert len(book_html.MATH_FAILURES) == 1 and repr(tex) in book_html.MATH_FAILURES[0]


def test_a_widget_becomes_a_still_and_its_state_leaves_the_notebook():
    png = b"\x89PNG\r\n\x1a\n fake"

    def model(name, **state):
        return {"model_name": name, "model_module": "@jupyter-widgets/controls", "state": state}

    saved = {
        "box": model("VBoxModel", children=["IPY_MODEL_slider", "IPY_MODEL_menu", "IPY_MODEL_text", "IPY_MODEL_image"]),
        "slider": model("FloatSliderModel", description="theta", value=0.25),
        "menu": model("DropdownModel", description="state", index=1, _options_labels=["all", "n = 1"]),
        "text": model("HTMLModel", value="<b>|q| = 0.91</b>"),
        "image": {**model("ImageModel", format="png"),
                  "buffers": [{"path": ["value"], "data": base64.b64encode(png).decode(), "encoding": "base64"}]},
    }
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["widgets"] = {book_html.WIDGET_STATE: {"state": saved, "version_major": 2, "version_minor": 0}}
    cell = nbformat.v4.new_code_cell("widget")
    cell.outputs = [nbformat.v4.new_output("execute_result", execution_count=1, data={
        "text/plain": "VBox(...)", book_html.WIDGET_VIEW: {"model_id": "box", "version_major": 2}})]
    notebook.cells = [cell]
    assert book_html.freeze_widgets(notebook) == 1
    assert "widgets" not in notebook.metadata
    (data,) = [o["data"] for o in cell.outputs]
    assert list(data) == ["text/html"]
    still = data["text/html"]
    assert book_html.WIDGET_NOTE in still and "theta = 0.25" in still and "state = n = 1" in still
    assert "<b>|q| = 0.91</b>" in still and f"data:image/png;base64,{base64.b64encode(png).decode()}" in still


def test_navigation_links_only_where_there_is_a_page():
    first = book_html.nav_html(None, book_html.PageLink("02_b.html", "02 · <B>"), position="top")
    assert 'rel="prev"' not in first and 'rel="contents" href="index.html"' in first
    assert 'rel="next" href="02_b.html">02 · &lt;B&gt; →' in first
    middle = book_html.nav_html(book_html.PageLink("01_a.html", "01 · A"), book_html.PageLink("03_c.html", "03 · C"),
                                position="bottom")
    assert 'rel="prev" href="01_a.html"' in middle and 'rel="next" href="03_c.html"' in middle


def test_markdown_solutions_show_as_a_label_in_the_teachers_book():
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("Derive.\n### BEGIN SOLUTION\n$w = 1$\n### END SOLUTION\nNext."),
                      nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION")]
    assert book_html.label_solutions(notebook) == 1
    assert notebook.cells[0].source == "Derive.\n**Solution.**\n$w = 1$\nNext."
    assert "### BEGIN SOLUTION" in notebook.cells[1].source  # code keeps its markers
