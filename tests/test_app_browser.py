"""The running app in Debian's headless Chromium: load the page, send a text message, see two
answers with behaviour badges, save a screenshot. Never runs ``playwright install``: the
browser is the distribution's (``apt-get install chromium``, as .ci/run does)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fusion.detectors import detect
from fusion.presets import get_preset, probe_path
from fusion.probes import is_correct, load_probes
from studio.behaviour import probe_counts

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)"),
]


def settled_texts(locator, timeout: float = 60.0) -> list[str]:
    """The locator's texts once they stop changing (the answers have finished streaming)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        texts = [t.strip() for t in locator.all_inner_texts()]
        if texts == last and all(texts):
            return texts
        last = texts
        time.sleep(1.0)
    raise AssertionError(f"answers still changing after {timeout} s: {last}")


@contextmanager
def opened(url: str, ready: str = "Ready") -> Iterator:
    """A fresh Chromium page on the app at ``url``, once its status line says ``ready``."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            expect(page.locator("#nf-status")).to_contain_text(ready, timeout=30_000)
            yield page
        finally:
            browser.close()


@pytest.fixture
def page(app):
    """A fresh browser page on the running app, once its models are ready."""
    with opened(app.url) as page:
        yield page


def test_text_chat_in_browser(page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    status = page.locator("#nf-status")  # the page names what it runs, and what the pocket world knows
    expect(status).to_contain_text("Pocket-LLaVA and its base Pocket-Vicuna, fused with neu-p-taska (preset pocket)")
    expect(status).to_contain_text("capitals and languages of 40 invented countries")
    probe = load_probes(probe_path(get_preset("pocket")))[0][0]
    question = probe.question
    page.get_by_role("tab", name="Text chat").click()
    box = page.locator(".nf-message textarea").locator("visible=true")
    box.fill(question)
    box.press("Enter")
    columns = page.locator(".nf-column").locator("visible=true")
    expect(columns).to_have_count(2)
    answers = columns.locator("[data-testid='bot']")
    expect(answers).to_have_count(2, timeout=60_000)
    texts = settled_texts(answers)
    for i, text in enumerate(texts):
        labels = [m.label for m in detect(text)]
        badges = columns.nth(i).locator(".nf-badge")
        expect(badges).to_have_count(1 + max(1, len(labels)))  # a probe's question: ✓/✗ first, then the labels
        expect(badges.first).to_have_text("✓ right" if is_correct(text, probe) else "✗ wrong")
        for label in labels or ["clean"]:
            expect(columns.nth(i).locator(f".nf-{label}")).to_be_visible()
    shot = tmp_path / "text-chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"\nanswers: {texts}\nscreenshot: {shot}")


def test_image_example_fills_image_and_question_and_both_answer(page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page.locator("#nf-image-examples tr.tr-body").first.click()
    box = page.locator(".nf-message textarea").locator("visible=true")
    expect(box).not_to_have_value("", timeout=10_000)
    question = box.input_value()
    page.locator(".nf-send").locator("visible=true").click()
    columns = page.locator(".nf-column").locator("visible=true")
    answers = columns.locator("[data-testid='bot']")
    expect(answers).to_have_count(2, timeout=60_000)
    texts = settled_texts(answers)
    assert len(texts) == 2 and all(texts)
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)
    expect(columns.locator(".nf-context_hallucination")).to_have_count(0)  # image prompts never carry it
    assert question in columns.first.inner_text()
    page.screenshot(path=str(tmp_path / "image-example.png"), full_page=True)


def test_behaviour_tab_runs_the_probes_with_progress(page, tmp_path: Path) -> None:
    """Behaviour tab, 4 probes of each kind: a progress line moves per batch ("replies 4/16 ·
    ..."), then three rows of rates (base, original, fused), every probe with the three replies,
    and the replies as a JSONL file to download."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Behaviour").click()
    expect(page.locator("#nf-bench-table")).to_contain_text("No run yet")  # an empty state, not a blank
    headers = page.locator("#nf-bench-probes [role=columnheader]")
    expect(headers.first).to_contain_text("image")
    assert "skill" in headers.nth(1).inner_text() and "Pocket-Vicuna (base LLM)" in headers.nth(4).inner_text()  # not "1 2 3"
    for slider, most in zip(("#nf-bench-text", "#nf-bench-image"), probe_counts(get_preset("pocket"))):
        expect(page.locator(f"{slider} input[type=range]")).to_have_attribute("max", str(most))  # each set's own bound
        box = page.locator(f"{slider} input[type=number]")
        box.fill("4")
        box.press("Enter")
    # the progress line is transient: record every one the page shows, however briefly
    page.evaluate(
        """() => {
            window.nfProgress = [];
            window.nfBars = 0;
            new MutationObserver(() => {
                const lines = document.body.innerText.match(/replies \\d+\\/\\d+ · [^\\n]*/g) || [];
                if (lines.length) window.nfProgress.push(lines[0]);
                // the bars drawn (each also has a screen-reader copy of its line, not drawn)
                const bars = [...document.querySelectorAll(".progress-level-inner")].filter(e => /replies \\d+/.test(e.textContent));
                window.nfBars = Math.max(window.nfBars, bars.length);
            }).observe(document.body, {childList: true, subtree: true, characterData: true});
        }"""
    )
    page.locator("#nf-bench-run").click()
    rows = page.locator("#nf-bench-table table").first.locator("tbody tr")
    expect(rows).to_have_count(3, timeout=120_000)
    seen = page.evaluate("window.nfProgress")
    assert any(re.match(r"replies \d+/\d+ · Pocket-", line) for line in seen), seen
    assert page.evaluate("window.nfBars") == 1  # one progress line, not one per output
    assert [t.split("\t")[0] for t in rows.all_inner_texts()] == ["Pocket-Vicuna (base LLM)", "Pocket-LLaVA (original)", "Pocket-LLaVA + Neuron-Fusion (neu-p-taska)"]
    grid = page.locator("#nf-bench-probes [role=grid]")
    expect(grid).to_have_attribute("aria-rowcount", str(1 + 4 + 4))  # the header, 4 text and 4 image probes
    expect(grid.locator("[role=columnheader]")).to_have_count(4 + 3)  # image, skill, question, expected, a reply per model
    expect(page.locator("#nf-bench-table")).to_contain_text("blank image")
    expect(grid).to_contain_text(load_probes(probe_path(get_preset("pocket")))[0][0].question)
    skills = grid.locator("[role=row]").locator("[role=gridcell]:nth-child(2)").all_inner_texts()
    assert len({t.strip() for t in skills if t.strip()}) >= 4 + 1  # four text probes of four skills, and the image ones'
    expect(page.locator("#nf-bench-tradeoff img")).to_be_visible()  # where this run sits among the baselines' sweeps
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)
    link = page.locator("#nf-bench-replies a").first
    expect(link).to_have_attribute("href", re.compile(r"behaviour-pocket\.jsonl$"))
    with urllib.request.urlopen(link.get_attribute("href"), timeout=10) as r:
        replies = [json.loads(line) for line in r.read().decode().splitlines()]
    assert len(replies) == 4 + 2 * 8 and {r["model"] for r in replies} == {"base", "tuned", "fused"}
    page.screenshot(path=str(tmp_path / "behaviour.png"), full_page=True)


def test_a_refused_message_is_one_toast_and_no_error_pills(page) -> None:
    """An empty message: one toast that says why, and no red "Error" over the outputs (a
    raised error would mark each of the event's outputs); the chats stay as they were."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Text chat").click()
    page.locator(".nf-send").locator("visible=true").click()
    toasts = page.locator("[data-testid='toast-body']")
    expect(toasts).to_have_count(1, timeout=10_000)
    expect(toasts.first).to_contain_text("empty")
    page.wait_for_timeout(1500)
    expect(toasts).to_have_count(1)
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)
    expect(page.locator(".nf-column").locator("visible=true").locator("[data-testid='bot']")).to_have_count(0)


@pytest.fixture(scope="module")
def recipe_app(tmp_path_factory: pytest.TempPathFactory):
    """An app started with a recipe of its own (``--set suppress=0.3``), as a teacher sets a Space up."""
    from conftest import running_app

    with running_app(tmp_path_factory.mktemp("recipe"), args=["--set", "suppress=0.3"]) as running:
        yield running


def pick(page, name: str) -> None:
    """Choose ``name`` in the Fusion tab's method dropdown, as a visitor does."""
    page.locator("#nf-method input").click()
    page.get_by_role("option", name=name, exact=True).click()


def test_fusion_controls_keep_the_apps_recipe_and_plots_show_for_every_method(recipe_app) -> None:
    """The status line and fused column titles name the recipe; picking another method and
    back brings the app's settings back (not the method's defaults), as does the reset
    button; a TIES fusion renames the fused columns and still draws the pair's change."""
    from playwright.sync_api import expect

    with opened(recipe_app.url, "fused with neu-p-taska · suppress 0.3 (preset pocket)") as page:
        expect(page.get_by_text("Pocket-LLaVA + Neuron-Fusion (neu-p-taska · suppress 0.3)", exact=True).locator("visible=true")).to_have_count(1)
        page.get_by_role("tab", name="Fusion").click()
        suppress = page.locator(".nf-param").filter(has_text="suppress").locator("input[type=number]")
        expect(suppress).to_have_value("0.3")
        expect(page.locator("#nf-curve img")).to_be_visible()
        expect(page.locator("#nf-share img")).to_be_visible()
        pick(page, "ties")
        expect(page.locator(".nf-param").filter(has_text="density").first).to_be_visible()
        expect(suppress).to_be_hidden()
        pick(page, "neu-p-taska")
        expect(suppress).to_have_value("0.3")  # the app's recipe, not the default 0.1
        suppress.fill("0.7")
        suppress.press("Enter")
        page.locator("#nf-reset").click()
        expect(suppress).to_have_value("0.3")
        expect(page.locator("#nf-fuse-note")).to_contain_text("back to the app's recipe, neu-p-taska · suppress 0.3")
        pick(page, "ties")
        page.locator("#nf-fuse").click()
        expect(page.locator("#nf-fuse-note")).to_contain_text("Fused with ties", timeout=60_000)
        expect(page.locator("#nf-fuse-note")).to_contain_text("Every setting is at its default.")
        expect(page.locator("#nf-curve img")).to_be_visible()  # the pair's change, though TIES locates nothing
        page.get_by_role("tab", name="Text chat").click()
        expect(page.get_by_text("Pocket-LLaVA + ties", exact=True).locator("visible=true")).to_have_count(1)  # the text tab's fused column
        expect(page.get_by_text("Error", exact=True)).to_have_count(0)


def test_follow_ups_and_a_chats_trash_icon(page) -> None:
    """A follow-up is answered in the same conversation (no Clear needed); a chat's own trash
    icon starts a new conversation in every column, so the next question comes alone."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Text chat").click()
    box = page.locator(".nf-message textarea").locator("visible=true")
    columns = page.locator(".nf-column").locator("visible=true")
    answers = columns.locator("[data-testid='bot']")
    for turns, question in enumerate(("Name the opposite of hot.", "What sound does a cow make?"), start=1):
        box.fill(question)
        box.press("Enter")
        expect(answers).to_have_count(2 * turns, timeout=60_000)
        settled_texts(answers)
    columns.first.get_by_role("button", name=re.compile("clear", re.IGNORECASE)).click()
    expect(answers).to_have_count(0)
    box.fill("Name the plural of cat.")
    box.press("Enter")
    expect(answers).to_have_count(2, timeout=60_000)  # one turn each: the old history went with the trash
    settled_texts(answers)
    expect(columns.locator("[data-testid='user']")).to_have_count(2)
