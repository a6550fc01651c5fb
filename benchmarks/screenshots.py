"""Screenshots of each tab of the app on the pocket preset, for the README.

    python benchmarks/screenshots.py [--out docs/screenshots]

Starts ``python app.py`` as the tests do (tests/conftest.py), drives Debian's headless
Chromium (/usr/bin/chromium) with Playwright: asks a text and an image question, fuses, runs
the probes, and saves one PNG per tab.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import running_app  # noqa: E402
from fusion.presets import get_preset  # noqa: E402
from studio.view import example_images, example_prompts  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def ask(page: Page, question: str) -> None:
    """Send a message in the visible tab and wait until both answers are there."""
    box = page.locator(".nf-message textarea").locator("visible=true")
    answers = page.locator(".nf-column").locator("visible=true").locator("[data-testid='bot']")
    before = answers.count()
    box.fill(question)
    box.press("Enter")
    expect(answers).not_to_have_count(before, timeout=60_000)
    page.wait_for_timeout(3000)  # the answers finish streaming


def tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.wait_for_timeout(500)


def shoot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset("pocket")
    with tempfile.TemporaryDirectory() as tmp, running_app(Path(tmp)) as app, sync_playwright() as p:
        print(f"app ready {app.ready_seconds:.1f} s after start")
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app.url)
        expect(page.locator("#nf-status")).to_contain_text("Ready", timeout=30_000)

        image, question = example_images(preset)[0]
        page.locator("input[type=file]").first.set_input_files(image)
        page.wait_for_timeout(1500)
        ask(page, question)
        shoot(page, out / "image-chat.png")

        tab(page, "Text chat")
        page.get_by_label("Also ask the base LLM").check()
        asked = dict(example_prompts(preset))
        ask(page, asked["language"])
        ask(page, asked["opposite"])  # a follow-up in the same conversation: no Clear needed
        shoot(page, out / "text-chat.png")

        tab(page, "Fusion")
        page.locator("#nf-method input").click()
        page.get_by_role("option", name="neu-p-bread", exact=True).click()
        page.get_by_role("button", name="Fuse").click()
        expect(page.get_by_text("your fused columns now use it")).to_be_visible(timeout=60_000)
        shoot(page, out / "fusion.png")

        tab(page, "Behaviour")
        page.get_by_role("button", name="Run probes").click()
        expect(page.locator("#nf-bench-table table").first).to_be_visible(timeout=120_000)
        page.wait_for_timeout(1000)
        shoot(page, out / "behaviour.png")
        browser.close()


if __name__ == "__main__":
    main()
