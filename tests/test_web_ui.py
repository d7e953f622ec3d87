"""The chat page at `/`, in a real browser: Debian's chromium driven by playwright against a
real `pagedllm serve` (with --api-key, so the page has to ask for it) on the bundled model.

A streamed reply grows on the page and matches the same request made directly; Stop aborts
and the server's running count returns to 0; markup in a message shows as text and runs
nothing; the key prompt; a narrow screen; `--no-web-ui`.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from server_utils import DEFAULT_ARGS, RemoteServer

from pagedllm.entrypoints.openai.web_ui import STATIC_DIR

KEY = "web-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "SmolLM2-135M-Instruct"
EVIL = "<img src=x onerror=alert(1)> <img src=y onerror=\"window.pwned=1\"> <script>window.pwned=2</script>"
WAIT_MS = 120_000  # a generous bound for a reply on a busy 2-core machine; tests end far sooner


def _chromium() -> str:
    for candidate in (os.environ.get("PAGEDLLM_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    pytest.fail("no chromium: run scripts/setup.sh (apt-get install chromium) or set PAGEDLLM_CHROMIUM")


@pytest.fixture(scope="module")
def servers():
    """The page's server (with an API key) and one started with --no-web-ui, started side by side."""
    with ThreadPoolExecutor(2) as pool:
        web = pool.submit(RemoteServer, [*DEFAULT_ARGS, "--api-key", KEY])
        no_ui = pool.submit(RemoteServer, [*DEFAULT_ARGS, "--no-web-ui"])
        started = [web.result(), no_ui.result()]
    yield started
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium())
        yield browser
        browser.close()


@dataclass
class Tab:
    """A browser tab on the page, with what it did: dialogs (any alert() would be a script the
    page let run), uncaught script errors, and the bodies it sent to /v1/chat/completions."""

    page: Any
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    chat_requests: list[dict] = field(default_factory=list)

    def on_request(self, request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            self.chat_requests.append(request.post_data_json)

    def on_dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def _open(browser, server, key: str | None = KEY, **context_args) -> Tab:
    """A fresh tab (its own sessionStorage) on the page; `key` pre-set as if typed earlier."""
    context = browser.new_context(**context_args)
    if key:
        context.add_init_script(f"sessionStorage.setItem('pagedllm-api-key', {key!r})")
    tab = Tab(context.new_page())
    tab.page.on("dialog", tab.on_dialog)
    tab.page.on("pageerror", lambda e: tab.errors.append(str(e)))
    tab.page.on("request", tab.on_request)
    tab.page.goto(server.url("/"))
    if key:
        _wait_model_name(tab.page)
    return tab


def _wait_model_name(page) -> None:
    page.wait_for_function("(name) => document.getElementById('model-name').textContent === name", arg=MODEL, timeout=30_000)


def _settings(page, temperature="0", max_tokens="16", system=""):
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.fill("#system-prompt", system)


def _wait_reply_done(page, count: int) -> None:
    """Until the page shows `count` assistant replies, the last one finished (its stats line)."""
    page.wait_for_function(
        """(count) => document.querySelectorAll('.msg.assistant').length === count && !document.querySelector('.msg.streaming')
                      && document.querySelectorAll('.msg.assistant .stats').length === count""",
        arg=count, timeout=WAIT_MS,
    )


def _rendered_text(page, markdown: str) -> str:
    return page.evaluate("(md) => { const d = document.createElement('div'); d.appendChild(renderMarkdown(md)); return d.textContent; }", markdown)


def test_page_is_served_without_key_and_locked_down(server):
    page = httpx.get(server.url("/"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path in re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text):
        assert httpx.get(server.url(path)).status_code == 200, path
    assert httpx.get(server.url("/v1/models")).status_code == 401  # the key still guards the API
    assert f"chat page at {server.base_url}/" in server.read_log()


def test_no_web_ui(servers):
    no_ui = servers[1]
    response = httpx.get(no_ui.url("/"))
    assert response.status_code == 404 and "error" in response.json()
    assert "chat page" not in no_ui.read_log()


def test_model_text_never_becomes_markup():
    """No script can turn text into markup: the page builds elements by name and fills them with textContent."""
    for path in STATIC_DIR.glob("*.js"):
        source = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "DOMParser"):
            assert sink not in source, f"{path.name} uses {sink}"


MARKDOWN_CASES = [
    ("# T\npara **b** *i* `a<b>` ~~s~~ [l](https://x.org) [j](javascript:alert(1))",
     '<h1>T</h1><p>para <strong>b</strong> <em>i</em> <code>a&lt;b&gt;</code> <del>s</del> '
     '<a href="https://x.org" target="_blank" rel="noopener noreferrer">l</a> [j](javascript:alert(1))</p>'),
    ("- a\n- b\n  - c\n\n3. x\n4. y", "<ul><li>a</li><li>b<ul><li>c</li></ul></li></ul><ol start=\"3\"><li>x</li><li>y</li></ol>"),
    ("```py\nx = '<b>'\n\ny\n```\nafter", '<div class="code-block"><div class="code-lang">py</div><pre><code>x = \'&lt;b&gt;\'\n\ny</code></pre></div><p>after</p>'),
    ("```\nstill streaming", "<div class=\"code-block\"><pre><code>still streaming</code></pre></div>"),
    ("| a | b |\n|---|:-:|\n| 1 | **2** |", '<div class="table-wrap"><table><thead><tr><th>a</th><th>b</th></tr></thead>'
     "<tbody><tr><td>1</td><td><strong>2</strong></td></tr></tbody></table></div>"),
    ("> q\n\n---\nline 1\nline 2", "<blockquote><p>q</p></blockquote><hr><p>line 1<br>line 2</p>"),
]


def test_markdown_rendering(browser):
    page = browser.new_page()
    page.add_script_tag(path=str(STATIC_DIR / "markdown.js"))
    for markdown, html in MARKDOWN_CASES:
        rendered = page.evaluate("(md) => { const d = document.createElement('div'); d.appendChild(renderMarkdown(md)); return d.innerHTML; }", markdown)
        assert rendered == html, markdown
    page.close()


def test_streamed_reply_conversation_and_new_chat(browser, server):
    tab = _open(browser, server)
    page = tab.page
    _settings(page, max_tokens="24", system="You are terse.")
    # Record the reply's length at every DOM change: a streamed reply grows in steps.
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.msg.assistant .content');
            if (replies.length) window.lengths.push(replies[replies.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#input", "List three colors.")
    page.press("#input", "Enter")
    assert page.input_value("#input") == ""
    _wait_reply_done(page, 1)
    lengths = page.evaluate("window.lengths")
    growing = sorted(set(n for n in lengths if n > 0))
    assert len(growing) >= 3, f"the reply did not appear in steps: lengths {lengths}"

    # The page's reply is the server's reply to the same request, made directly.
    request = tab.chat_requests[0]
    assert request["stream"] and request["stream_options"] == {"include_usage": True}
    assert (request["temperature"], request["max_tokens"], request["model"]) == (0, 24, MODEL)
    assert request["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "List three colors."}]
    direct = httpx.post(server.url("/v1/chat/completions"), headers=AUTH, timeout=120, json={**request, "stream": False, "stream_options": None}).json()
    text = direct["choices"][0]["message"]["content"]
    reply = page.locator(".msg.assistant").first
    assert reply.locator(".content").text_content() == _rendered_text(page, text)
    assert reply.locator(".stat-tokens").text_content() == f"{direct['usage']['completion_tokens']} tokens"
    assert re.fullmatch(r"TTFT \d+\.\d\d s", reply.locator(".stat-ttft").text_content())
    assert re.fullmatch(r"\d+\.\d tok/s", reply.locator(".stat-rate").text_content())

    # Shift+Enter is a new line; the next turn carries the conversation and the edited system prompt.
    page.fill("#system-prompt", "You are kind.")
    page.type("#input", "And two")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("more?")
    assert page.input_value("#input") == "And two\nmore?"
    page.keyboard.press("Enter")
    _wait_reply_done(page, 2)
    assert tab.chat_requests[1]["messages"] == [
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "List three colors."},
        {"role": "assistant", "content": text},
        {"role": "user", "content": "And two\nmore?"},
    ]

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.fill("#max-tokens", "2")
    page.fill("#input", "Hi")
    page.click("#send")
    _wait_reply_done(page, 1)
    assert tab.chat_requests[2]["messages"] == [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi"}]
    assert not tab.errors and not tab.dialogs
    page.context.close()


def test_stop_aborts_the_request_on_the_server(browser, server):
    tab = _open(browser, server)
    page = tab.page
    _settings(page, max_tokens="1500")
    page.fill("#input", "Write a very long story about a dragon.")
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('.msg.assistant .content')?.textContent.length > 0", timeout=WAIT_MS)
    assert server.metric("num_requests_running") == 1
    page.click("#stop")
    deadline = time.monotonic() + 30
    while server.metric("num_requests_running") != 0:
        assert time.monotonic() < deadline, "the stopped request still runs on the server"
        time.sleep(0.2)
    assert server.metric("kv_cache_usage_perc") == 0
    _wait_reply_done(page, 1)
    assert page.locator(".msg.assistant .stat-stopped").text_content() == "stopped"
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    assert not page.locator(".msg.assistant .error").count()
    page.context.close()


def test_markup_in_messages_shows_as_text_and_runs_nothing(browser, server):
    tab = _open(browser, server)
    page = tab.page
    # The renderer every message goes through, model replies included.
    markdown = f"**bold** {EVIL}\n\n```html\n{EVIL}\n```\n\n- `{EVIL}`\n\n[x](javascript:alert(1))"
    tags = page.evaluate("""(md) => {
        const d = document.createElement('div'); d.appendChild(renderMarkdown(md));
        return [...d.querySelectorAll('*')].map((e) => e.tagName.toLowerCase());
    }""", markdown)
    assert "strong" in tags and "pre" in tags and not {"img", "script", "a"} & set(tags), tags
    assert _rendered_text(page, EVIL) == EVIL

    # The same text through the chat: as the user's message and the system prompt.
    _settings(page, max_tokens="1", system=EVIL)
    page.fill("#input", EVIL)
    page.press("#input", "Enter")
    _wait_reply_done(page, 1)
    assert tab.chat_requests[0]["messages"] == [{"role": "system", "content": EVIL}, {"role": "user", "content": EVIL}]
    assert page.locator(".msg.user .content").text_content() == EVIL
    page.wait_for_timeout(300)  # an image's onerror would have fired by now
    assert page.locator("img").count() == 0 and page.locator("body script").count() == 0
    assert page.evaluate("window.pwned") is None and not tab.dialogs and not tab.errors
    page.context.close()


def test_api_key_prompt(browser, server):
    tab = _open(browser, server, key=None)
    page = tab.page
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    page.fill("#key-input", "wrong")
    page.press("#key-input", "Enter")
    page.wait_for_function("() => document.getElementById('key-error').textContent === 'wrong API key'")
    assert dialog.is_visible()
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    _wait_model_name(page)
    assert not dialog.is_visible()
    assert page.evaluate("sessionStorage.getItem('pagedllm-api-key')") == KEY
    page.reload()  # the key stays for this tab
    _wait_model_name(page)
    assert not dialog.is_visible()
    page.context.close()


def test_narrow_screen(browser, server):
    tab = _open(browser, server, viewport={"width": 360, "height": 640}, is_mobile=True, has_touch=True)
    page = tab.page
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # nothing sticks out sideways
    for selector in ("#input", "#send", "#new-chat"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360 and box["y"] + box["height"] <= 640, selector
    assert not page.locator("#system-prompt").is_visible()  # settings fold away ...
    page.click("#toggle-settings")
    assert page.locator("#system-prompt").is_visible()  # ... behind a button
    page.fill("#max-tokens", "1")
    page.fill("#input", "x" * 200 + "\n```\n" + "long_line = 1; " * 30 + "\n```")  # wider than the screen
    page.click("#send")
    _wait_reply_done(page, 1)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # long words wrap, code scrolls in its box
    page.context.close()
