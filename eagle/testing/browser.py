"""The evaluation report in a real browser: headless Chromium (Debian package ``chromium``) checks a page for
console errors, broken images and text overflowing its card, and takes the screenshots in docs/.

The report has no scripts; the checks run in a copy with one script put first in its head, which opens every
collapsed section, measures, and writes its findings into the DOM that ``--dump-dom`` prints.

    python -m eagle.testing.browser check report.html [--width 800]
    python -m eagle.testing.browser screenshots report.html docs/ [--product grid]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

CHROMIUM = "/usr/bin/chromium"
WINDOW = (1280, 2000)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

# Collects errors from the start; after load opens every <details> and reports, per card, text whose line boxes
# leave the card, elements wider than themselves (scrollWidth), images that did not decode, page-wide overflow.
CHECK_SCRIPT = """<script>
window.__errors = [];
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => { window.__errors.push(level + ": " + args.join(" ")); original(...args); };
}
window.addEventListener("error", e => window.__errors.push("error event: " + (e.message || e.target.outerHTML
  .slice(0, 80))), true);
window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => d.open = true);
  const out = {errors: window.__errors, overflow: [], broken: [], cards: 0, pageOverflow: 0};
  for (const card of document.querySelectorAll(".card")) {
    out.cards++;
    const box = card.getBoundingClientRect();
    const walker = document.createTreeWalker(card, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (node.parentElement.closest(".lightbox") || !node.textContent.trim()) continue;
      const range = document.createRange();
      range.selectNodeContents(node);
      for (const r of range.getClientRects()) {
        if (r.right > box.right + 0.5 || r.left < box.left - 0.5) {
          out.overflow.push(card.id + ": " + node.textContent.slice(0, 60));
          break;
        }
      }
    }
    for (const el of card.querySelectorAll("*")) {
      if (!el.closest(".lightbox") && el.clientWidth && el.scrollWidth > el.clientWidth + 1) {
        out.overflow.push(card.id + ": <" + el.tagName.toLowerCase() + "> wider than its box");
      }
    }
  }
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) out.broken.push(img.alt);
  }
  out.pageOverflow = document.documentElement.scrollWidth - window.innerWidth;
  // what the first screen says: the first line of text, where the top blocks sit, and whether the key figures'
  // key columns (fixed, introduced, MLLM ms) are in view without scrolling
  out.firstLine = document.body.innerText.trim().split(String.fromCharCode(10))[0];
  out.top = {};
  for (const id of ["verdict", "parse-alarm", "coverage", "provenance", "key-figures", "introduced"]) {
    const el = document.getElementById(id);
    if (el) out.top[id] = Math.round(el.getBoundingClientRect().top + window.scrollY);
  }
  out.keyColumns = [...document.querySelectorAll("#key-figures th .key")].map(k => {
    const r = k.closest("th").getBoundingClientRect();
    return {label: k.textContent, right: Math.round(r.right), visible: r.right <= window.innerWidth};
  });
  out.width = window.innerWidth;
  const pre = document.createElement("pre");
  pre.id = "__check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def available() -> bool:
    return os.access(CHROMIUM, os.X_OK)


def _run(args: list[str], timeout: float = 120, width: int = WINDOW[0]) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{WINDOW[1]}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check_page(html: str, width: int = WINDOW[0]) -> dict[str, Any]:
    """Load `html` (a whole page) at `width` pixels with CHECK_SCRIPT and return its findings: ``errors``
    (console errors and warnings, error events), ``overflow`` (card text outside its card), ``broken`` (images),
    ``cards``, ``pageOverflow`` (pixels of horizontal scrolling at the window width), ``firstLine`` (the page's
    first line of text), ``top`` (page offsets of the top blocks by id) and ``keyColumns`` (the key figures'
    key columns: whether each is in view without scrolling)."""
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp, "check.html")
        page.write_text(html.replace("<head>", "<head>" + CHECK_SCRIPT, 1))
        proc = _run(["--virtual-time-budget=30000", "--dump-dom", page.as_uri()], width=width)
    found = re.search(r'<pre id="__check">(.*?)</pre>', proc.stdout, re.S)
    if not found:
        raise RuntimeError(f"chromium printed no check result (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


def screenshot(html: str, png: str, height: int = WINDOW[1], colours: int = 256, width: int = WINDOW[0]) -> None:
    """The top `height` pixels of `html` at `width`, as a palette PNG (docs stay small)."""
    with tempfile.TemporaryDirectory() as tmp:
        page, shot = Path(tmp, "page.html"), Path(tmp, "shot.png")
        page.write_text(html)
        _run([f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri()], width=width)
        image = Image.open(shot).convert("RGB").quantize(colors=colours)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    Path(png).write_bytes(out.getvalue())


def product_only(html: str, product_id: str) -> str:
    """The page with one product section open and everything else hidden."""
    html = html.replace(f'<details class="product" id="{product_id}">',
                        f'<details class="product" id="{product_id}" open>', 1)
    return html.replace("</style>", f"body > :not(#{product_id}) {{ display: none; }}</style>", 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eagle.testing.browser", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="Console errors, broken images, text overflowing cards.")
    check.add_argument("report")
    check.add_argument("--width", type=int, default=WINDOW[0], help="Window width, pixels (default 1280).")
    shots = sub.add_parser("screenshots", help="report-first-screen.png (1280×800), report-summary.png and "
                                               "report-product.png into a folder.")
    shots.add_argument("report")
    shots.add_argument("folder")
    shots.add_argument("--product", help="Product section to show (default: the first).")
    args = p.parse_args(argv)
    if not available():
        p.error(f"{CHROMIUM} not found: apt-get install chromium")
    html = Path(args.report).read_text()
    if args.command == "check":
        result = check_page(html, args.width)
        print(json.dumps(result, indent=2))
        return 1 if result["errors"] or result["overflow"] or result["broken"] else 0
    product = f"product-{args.product}" if args.product else re.search(r'class="product" id="([^"]+)"', html)[1]
    screenshot(html, os.path.join(args.folder, "report-first-screen.png"), height=800)
    screenshot(html, os.path.join(args.folder, "report-summary.png"))
    screenshot(product_only(html, product), os.path.join(args.folder, "report-product.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
