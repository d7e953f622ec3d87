"""Takes docs/web-ui.png: one exchange on the chat page of a running server, in chromium.

    pagedllm serve &                                   # or any running server
    python scripts/web_ui_screenshot.py --url http://127.0.0.1:8000 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import shutil

from playwright.sync_api import sync_playwright

PROMPT = "Write a Python function that reverses a string, and explain it in two sentences."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=None, help="the server's API key (default: none)")
    parser.add_argument("--out", default="docs/web-ui.png", help="where the PNG goes (default: docs/web-ui.png)")
    parser.add_argument("--max-tokens", default="160", help="reply length cap (default: 160)")
    args = parser.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or shutil.which("chromium-browser"))
        context = browser.new_context(viewport={"width": 1100, "height": 720}, device_scale_factor=1)
        if args.api_key:
            context.add_init_script(f"sessionStorage.setItem('pagedllm-api-key', {args.api_key!r})")
        page = context.new_page()
        page.goto(args.url)
        page.wait_for_function("() => !document.getElementById('model-name').textContent.startsWith('…')")
        page.fill("#system-prompt", "You are a helpful assistant.")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", args.max_tokens)
        page.fill("#input", PROMPT)
        page.press("#input", "Enter")
        page.wait_for_function("() => document.querySelector('.msg.assistant .stats')", timeout=600_000)
        page.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
