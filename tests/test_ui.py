"""The DAG visualizer in a real headless Chromium (Debian's ``chromium``,
driven by Playwright): a map-reduce workflow runs over HTTP while the page
watches its session, and the drawing, the live states, the details panel and
the timeline are checked through cytoscape's API and the DOM.

Chromium is required: without it this test fails (``make system-deps``
installs it); Playwright never downloads a browser of its own here.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

import parrot as P
from parrot import workflows
from parrot.semantic_vars.http_runtime import HttpRuntime

# The test's screenshot goes to a scratch folder (CI keeps the tree clean);
# PARROT_UI_SCREENSHOT=docs/ui-map-reduce.png refreshes the README's picture.
SCREENSHOT = Path(os.environ.get("PARROT_UI_SCREENSHOT") or Path(tempfile.gettempdir()) / "parrot-ui-map-reduce.png")
CHUNKS = workflows.split_paragraphs(workflows.SAMPLE_DOCUMENT)
WAIT_MS = 60_000


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: run `make system-deps` (Debian package `chromium`)")
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
        b = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def cy(page, expression: str):
    """Evaluate ``expression`` with ``cy`` bound to the page's cytoscape instance."""
    return page.evaluate(f"() => {{ const cy = window.parrotCy; return {expression}; }}")


def test_map_reduce_in_the_browser(live_server, browser):
    from playwright.sync_api import expect

    key = live_server.new_tenant("ui")
    runtime = HttpRuntime(live_server.url, api_key=key)
    session = P.Session(runtime).open()  # opened before the page, run while it watches
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    try:
        page.goto(live_server.url + "/ui")

        # A wrong key is refused and not kept.
        page.fill("#api-key", "pk-wrong")
        page.click("#login-submit")
        expect(page.locator("#login-error")).to_have_text("That key was not accepted.")
        assert page.evaluate("sessionStorage.getItem('parrot.apiKey')") is None

        page.fill("#api-key", key)
        page.click("#login-submit")
        entry = page.locator(f'#session-list button[data-session-id="{session.id}"]')
        expect(entry).to_contain_text("open")
        entry.click()
        page.wait_for_function("document.body.dataset.live === '1'")  # following the SSE events
        assert cy(page, "cy.nodes().length") == 0
        assert key not in page.url  # the key is never put in a URL

        # Every state the page draws a call in, as it draws it.
        page.evaluate("() => { window.seen = []; window.parrotCy.on('add data', 'node.call', "
                      "(e) => window.seen.push(e.target.data('state'))); }")

        # Run the workflow; the page learns of it only through the events.
        with session:
            partial, merged = workflows.map_reduce_summary(CHUNKS)
            merged_value = merged.get()
            partial_values = [p.get(perf="throughput") for p in partial]
        n = len(CHUNKS)
        page.wait_for_function(
            f"() => {{ const c = window.parrotCy.nodes('.call'); return c.length === {n + 1} "
            "&& c.every((x) => x.data('state') === 'done'); }"
        )
        page.wait_for_function("document.getElementById('live').textContent === 'closed'")
        seen = set(page.evaluate("window.seen"))
        # Drawn while it ran, not only at the end: the reduce waited for the maps.
        assert "done" in seen and seen - {"done"}, seen

        # The drawing: calls and variables as nodes, data flow as edges.
        assert cy(page, "cy.nodes('.var').length") == 2 * n + 1  # chunks, partial summaries, the merge
        assert cy(page, "cy.nodes('.var.const').length") == n  # the chunks
        assert cy(page, "cy.edges().length") == 3 * n + 1
        assert cy(page, "cy.nodes('.var.set').length") == 2 * n + 1
        groups = cy(page, "cy.nodes('.group').map((g) => ({label: g.data('label'), children: g.children().length}))")
        assert groups == [{"label": f"task group · {n} calls · throughput", "children": n}]
        maps = cy(page, "cy.nodes('.call').filter((x) => x.data('function') === 'summarize_chunk')"
                        ".map((x) => ({prefix: x.data('prefix'), cls: x.hasClass('prefix'), parent: x.parent().id()}))")
        assert len(maps) == n and all(m["prefix"] == 1 and m["cls"] for m in maps)
        assert all(m["parent"].startswith("group:") for m in maps)
        assert cy(page, "cy.nodes('.call').every((x) => x.data('engine') === 'engine-0')")
        assert cy(page, "cy.nodes('.compressed').length") == 0  # no compression in this workflow
        expect(page.locator('#summary [data-state="done"]')).to_have_attribute("data-count", str(n + 1))
        expect(page.locator("#timeline .bar")).to_have_count(n + 1)
        expect(page.locator("#timeline .lane-label")).to_have_text(["engine-0"])

        # Click the reduce call where cytoscape drew it.
        reduce_id = cy(page, "cy.nodes('.call').filter((x) => x.data('function').startsWith('reduce_'))[0].id()")
        box = page.locator("#graph").bounding_box()
        pos = cy(page, f"cy.getElementById('{reduce_id}').renderedPosition()")
        page.mouse.click(box["x"] + pos["x"], box["y"] + pos["y"])
        details = page.locator(f'#details .detail[data-call-id="{reduce_id}"]')
        expect(details.locator('[data-field="state"]')).to_have_text("done")
        expect(details.locator('[data-field="engine"]')).to_have_text("engine-0")
        expect(details.locator('[data-field="cached_tokens"]')).to_have_text(
            re.compile(r"^\d+ tokens$"))
        for field in ("queued", "prefill", "decode"):
            expect(details.locator(f'[data-field="{field}"]')).to_have_text(re.compile(r"^[\d.]+ m?s$"))
        expect(details.locator('[data-output="summary"]')).to_contain_text(merged_value)  # folded when long
        prompt = details.locator('[data-field="prompt"]')
        expect(prompt).to_contain_text("Here are notes about one topic:")
        expect(prompt.locator(".var-input")).to_have_count(n)
        for value in partial_values:  # the maps' outputs, filled into the prompt
            if len(value) <= 160:
                expect(prompt).to_contain_text(value)
        assert cy(page, f"cy.getElementById('{reduce_id}').selected()")
        expect(page.locator(f'#timeline .bar.selected[data-call-id="{reduce_id}"]')).to_have_count(1)

        expect(page.locator("#legend .key.prefix")).to_have_text(["shared prefix #1"])

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        # A constant variable: its value is the chunk it carries.
        chunk_id = cy(page, "cy.nodes('.var.const')[0].id()")
        pos = cy(page, f"cy.getElementById('{chunk_id}').renderedPosition()")
        page.mouse.click(box["x"] + pos["x"], box["y"] + pos["y"])
        value = page.locator(f'#details .detail[data-var-id="{chunk_id}"] [data-field="value"]')
        shown = " ".join(value.inner_text().split())
        # Long values are folded to their first 80 characters and their length.
        folded = [f"{c[:80]}… ({len(c)} chars)" if len(c) > 160 else c for c in CHUNKS]
        assert shown in [" ".join(f.split()) for f in folded], shown

        # A call that carries compression statistics is marked with its ratio
        # (the same drawing code, fed the DAG with a ratio added).
        page.evaluate(
            f"""async () => {{
                const r = await fetch('/api/v1/sessions/{session.id}/dag',
                                      {{headers: {{Authorization: 'Bearer ' + sessionStorage.getItem('parrot.apiKey')}}}});
                const dag = await r.json();
                dag.calls.find((c) => c.call_id === '{reduce_id}').compression = {{ratio: 2.5, original_tokens: 100}};
                window.parrotView.update(dag);
            }}"""
        )
        assert cy(page, "cy.nodes('.compressed').map((x) => x.id())") == [reduce_id]
        assert "compressed 2.5×" in cy(page, f"cy.getElementById('{reduce_id}').data('label')")
    finally:
        page.close()
        if not session.closed:
            session.close(cancel=True)
        runtime.close()


def test_failed_calls_are_shown_with_their_error(live_server, browser):
    from playwright.sync_api import expect

    key = live_server.new_tenant("ui-failures")
    runtime = HttpRuntime(live_server.url, api_key=key)
    try:
        with P.Session(runtime) as session:
            too_long = workflows.summarize_chunk("word " * 4200)  # past the model's 4096 positions
            ok = workflows.summarize_chunk(CHUNKS[0])
            merged = workflows.reducer(2)(too_long, ok)
            with pytest.raises(P.CallFailedError):
                merged.get()
            ok.get()
    finally:
        runtime.close()
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(WAIT_MS)
    try:
        page.goto(live_server.url + "/ui/")
        page.fill("#api-key", key)
        page.click("#login-submit")
        page.click(f'#session-list button[data-session-id="{session.id}"]')
        page.wait_for_function("window.parrotCy && window.parrotCy.nodes('.call').length === 3")
        states = cy(page, "Object.fromEntries(cy.nodes('.call').map((x) => [x.id(), x.data('state')]))")
        assert sorted(states.values()) == ["done", "failed", "failed"]
        expect(page.locator('#summary [data-state="failed"]')).to_have_attribute("data-count", "2")
        assert cy(page, "cy.nodes('.var.failed').length") == 2  # the outputs that will never come
        failed_id = next(i for i, s in states.items()
                         if s == "failed" and cy(page, f"cy.getElementById('{i}').data('function')") == "summarize_chunk")
        box = page.locator("#graph").bounding_box()
        pos = cy(page, f"cy.getElementById('{failed_id}').renderedPosition()")
        page.mouse.click(box["x"] + pos["x"], box["y"] + pos["y"])
        details = page.locator(f'#details .detail[data-call-id="{failed_id}"]')
        expect(details.locator('[data-field="error"]')).to_contain_text("exceeds the model's 4096 positions")
        expect(details.locator('[data-field="state"]')).to_have_text("failed")
        # The 21,000-character input is folded in the prompt.
        expect(details.locator('[data-field="prompt"] details.fold summary')).to_have_text(
            re.compile(r"^word word .*… \(21000 chars\)$"))
    finally:
        page.close()
