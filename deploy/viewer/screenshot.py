"""Screenshot OHIF with the node's SEG overlay on one slice (the README's picture), headless.

    python deploy/viewer/screenshot.py --study UID --slice 25 --out docs/ohif-seg.png

Needs the viewer (``deploy/viewer/serve.py``) in front of an Orthanc that holds the study with
its SEG, Debian's ``chromium`` and the ``playwright`` package (its bundled browsers are not
used; nothing is downloaded). It opens the study, loads the "AI segmentation" series as an
overlay, scrolls to ``--slice`` (1 = the first image OHIF shows) and opens the segment list.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--viewer", default="http://127.0.0.1:3000")
    ap.add_argument("--study", required=True, help="StudyInstanceUID")
    ap.add_argument("--slice", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    with sync_playwright() as p:
        # software WebGL: OHIF renders with WebGL and the machine has no GPU
        browser = p.chromium.launch(
            executable_path=args.chromium, args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 860})
        page.goto(f"{args.viewer}/viewer?StudyInstanceUIDs={args.study}")
        page.get_by_text("Skip all").click(timeout=90_000)  # the first-visit tour
        page.get_by_text("Confirm and hide").click()  # the investigational-use banner
        page.get_by_text("AI segmentation").first.dblclick()
        page.get_by_role("button", name="Yes").click(timeout=60_000)  # "open this Segmentation?"
        time.sleep(5)
        page.locator(".cornerstone-viewport-element").first.hover()
        for _ in range(args.slice - 1):
            page.mouse.wheel(0, 100)
            time.sleep(0.15)
        if not page.get_by_text("Segmentations").first.is_visible():
            page.mouse.click(1381, 100)  # the right-hand panel's segmentation tab (fixed viewport)
        page.get_by_text("Segmentations").first.wait_for(timeout=30_000)
        time.sleep(3)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        browser.close()
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
