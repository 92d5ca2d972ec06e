"""The web view's renderer on its own (kernelpool/web/render.py): hostile markup leaves nothing
that can run or fetch, terminal colours survive as classes, images only from valid base64.
The browser tests (tests/test_web_view.py) check the same in Chromium; these pin the details."""

from __future__ import annotations

import re

from nbformat.v4 import new_code_cell, new_markdown_cell, new_output

from kernelpool.web import render

HOSTILE = [
    '<script>alert(1)</script>', '<img src=x onerror=alert(1)>', '<a href="javascript:alert(1)">x</a>',
    '<a href="JaVaScRiPt:alert(1)">x</a>', '<a href="jav&#x09;ascript:alert(1)">x</a>',
    '<svg onload=alert(1)><script>alert(1)</script></svg>', '<iframe srcdoc="<script>alert(1)</script>"></iframe>',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">', '<form action="https://e.x"><button>b</button></form>',
    '<div style="background:url(https://e.x)">s</div>', '<style>*{background:url(https://e.x)}</style>',
    '<object data="https://e.x"></object>', '<embed src="https://e.x">', '<base href="https://e.x/">',
    '<link rel=stylesheet href="https://e.x">', '<a href="/view/alice/kernels">own pages</a>',
    '<a href="data:text/html,<script>alert(1)</script>">d</a>', '<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>',
    '<details open ontoggle=alert(1)>', '<img srcset="https://e.x/a.png 1x">', '<input autofocus onfocus=alert(1)>',
]
DANGER = re.compile(r"<(script|iframe|object|embed|form|style|link|meta|base|svg|math|input)\b|\son\w+\s*=|javascript:|"
                    r"\sstyle\s*=|\ssrcset\s*=|href=\"/|href=\"data:", re.IGNORECASE)


def test_hostile_html_markdown_and_outputs_leave_nothing_that_runs() -> None:
    for markup in HOSTILE:
        for shown in (render.sanitise(markup), render.markdown(markup),
                      render.output({"output_type": "display_data", "data": {"text/html": markup}}),
                      render.output({"output_type": "display_data", "data": {"text/markdown": markup}})):
            assert not DANGER.search(shown), (markup, shown)
    assert 'rel="noopener noreferrer nofollow"' in render.sanitise('<a href="https://example.org">x</a>')


def test_text_stays_text_with_its_colours() -> None:
    shown = render.ansi("\x1b[0;31mValueError\x1b[0m: <b>bad</b> \x1b[1;92mok\x1b[39m plain\x1b]0;title\x07 \x1b[38;5;208mx")
    assert shown == ('<span class="ansi-red-fg">ValueError</span>: &lt;b&gt;bad&lt;/b&gt; '
                     '<span class="ansi-bright-green-fg ansi-bold">ok</span><span class="ansi-bold"> plain</span>'
                     '<span class="ansi-bold"> </span><span class="ansi-bold">x</span>')
    error = render.output({"output_type": "error", "ename": "E", "evalue": "v",
                           "traceback": ["\x1b[0;31mE\x1b[0m: <script>alert(1)</script>"]})
    assert "&lt;script&gt;" in error and "<script>" not in error


def test_images_only_from_valid_base64_and_svg_as_an_image() -> None:
    ok = render.output({"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=\n"}})
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in ok
    bad = render.output({"output_type": "display_data", "data": {"image/png": '"><script>alert(1)</script>'}})
    assert "<script" not in bad and "<img" not in bad
    svg = render.output({"output_type": "display_data", "data": {"image/svg+xml": "<svg onload=alert(1)></svg>"}})
    assert svg.startswith('<img class="output-image"') and "onload" not in svg  # base64 inside an <img>: no script runs


def test_cells_show_counts_running_state_and_the_richest_output() -> None:
    cell = new_code_cell("6*7", execution_count=3, outputs=[new_output(
        "execute_result", data={"text/plain": "42", "text/html": "<b>42</b>"}, execution_count=3)])
    shown = render.cell(cell)
    assert "[3]" in shown and "<b>42</b>" in shown and "running" not in shown
    running = render.cell(cell, running=True, live=[new_output("stream", name="stdout", text="so far")])
    assert "[*]" in running and 'aria-busy="true"' in running and "so far" in running and "<b>42</b>" not in running
    md = render.cell(new_markdown_cell("# Title <img src=x onerror=alert(1)>"))
    assert "<h1>Title <img>" in md
    long = render.output({"output_type": "stream", "name": "stdout", "text": "x" * 1_000_000})
    assert len(long) < 250_000 and "download the notebook" in long
