"""Chapter 04's CEMA widget: its contract, checked here rather than in the chapter.

The chapter builds the widget and prints how long a redraw takes; what a reader and the browser
test (tests/test_browser.py) rely on is checked here, on the chapter's own ``build_cema_widget``:

- the whole widget has CSS class ``cema-widget``; the sliders ``|q|`` (``cema-magnitude``) and
  ``θ₁`` (``cema-theta``, rad/token), the state selector ``cema-state``, the plot (an
  ``ipywidgets.Image``, ``cema-plot``) and the readout (``cema-readout``) carry their own;
- the sliders are the quantities the reader thinks in: the layer's coefficients have exactly that
  |q| and that base frequency;
- moving any control redraws the plot and the readout; the readout names θ₁ in one unit only;
- the panel titles hold no raw TeX (braces, carets, underscores) outside matplotlib's $…$;
- a redraw takes under a second on a CPU (the fastest of 5).
"""

from __future__ import annotations

import math
import re

import pytest
from chapter_code import chapter_definitions

from megalodon_lite.notebook import time_call

ipywidgets = pytest.importorskip("ipywidgets")


@pytest.fixture(scope="module")
def cema_widget():
    return chapter_definitions("04")["build_cema_widget"]()


def parts_of(widget) -> dict:
    controls = widget.children[0].children + (widget.children[1],)
    return {css: part for part in controls for css in part._dom_classes}


def test_the_widget_has_the_parts_the_browser_test_presses_and_reads(cema_widget):
    assert "cema-widget" in cema_widget._dom_classes
    parts = parts_of(cema_widget)
    assert isinstance(parts["cema-magnitude"], ipywidgets.FloatSlider) and parts["cema-magnitude"].description == "|q|"
    assert isinstance(parts["cema-theta"], ipywidgets.FloatSlider) and parts["cema-theta"].description == "θ₁"
    assert isinstance(parts["cema-state"], ipywidgets.Dropdown)
    assert isinstance(parts["cema-readout"], ipywidgets.HTML)
    assert isinstance(parts["cema-plot"], ipywidgets.Image) and parts["cema-plot"].value[:4] == b"\x89PNG"


@pytest.mark.parametrize("magnitude, theta", [(0.6, 0.05), (0.91, 0.1), (0.995, 0.385)])
def test_the_sliders_are_the_layers_magnitude_and_base_frequency(cema_widget, magnitude, theta):
    parts = parts_of(cema_widget)
    parts["cema-magnitude"].value, parts["cema-theta"].value = magnitude, theta
    _, q, _ = cema_widget.cell.coefficients()
    n = len(q[0])
    assert q.abs().sub(magnitude).abs().max() < 1e-6          # float32 coefficients
    assert abs(q[0, 0].angle().item() - theta) < 1e-5
    harmonics = q[0].angle() - theta * q.new_tensor(range(1, n + 1)).real  # θ_n = n θ₁ (mod 2π)
    assert (((harmonics + math.pi) % (2 * math.pi)) - math.pi).abs().max() < 1e-4
    half_life = math.log(2) / -math.log(magnitude)
    assert f"half-life {half_life:.2f} tokens" in parts["cema-readout"].value


def test_every_control_redraws_the_plot_and_the_readout(cema_widget):
    parts = parts_of(cema_widget)
    for css, value in (("cema-magnitude", 0.8), ("cema-theta", 0.2), ("cema-state", 3), ("cema-state", 0)):
        before = parts["cema-readout"].value, parts["cema-plot"].value
        parts[css].value = value
        assert parts["cema-readout"].value != before[0], css
        assert parts["cema-plot"].value != before[1], css
    parts["cema-state"].value = 1
    text = parts["cema-readout"].value
    assert text.count("rad") == 1 and "θ_1" in text, text  # θ₁ once, in rad/token only


def test_panel_titles_have_no_raw_tex(cema_widget):
    parts = parts_of(cema_widget)
    for state in (1, 0):
        parts["cema-state"].value = state
        for ax in cema_widget.figure.axes:
            for text in (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()):
                outside_math = re.sub(r"\$[^$]*\$", "", text)
                assert not re.search(r"[{}^_\\]", outside_math), f"raw TeX in {text!r}"


def test_one_redraw_takes_under_a_second(cema_widget):
    seconds = time_call(cema_widget.redraw, repeats=5, warmup=1, device="cpu", reduce="min")
    assert seconds < 1.0, f"one redraw took {seconds:.2f} s (the best of 5)"
