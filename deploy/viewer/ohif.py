"""OHIF 3.12 in headless Chromium, driven as a radiologist would: the steps the viewer test and the
README's screenshot share.

Needs Debian's ``chromium`` and the ``playwright`` package (its own browser downloads are not
used, nothing is downloaded) and the viewer (``serve.py``) in front of an Orthanc holding a study
the node processed. Chromium renders WebGL in software (SwiftShader): these machines have no GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

CHROMIUM = "/usr/bin/chromium"
# a dismissed error (OHIF's error boundary logs at debug level) or an uncaught one
FAILURE_MARKS = ("Error Boundary", "TypeError", "Something went wrong")


@dataclass
class Session:
    """One browser page on one study, with everything OHIF said that marks a failure."""

    page: object  # playwright.sync_api.Page
    failures: list[str] = field(default_factory=list)

    def watch(self) -> None:
        def console(msg) -> None:
            if any(mark in msg.text for mark in FAILURE_MARKS):
                self.failures.append(f"console {msg.type}: {msg.text[:300]}")

        self.page.on("console", console)
        self.page.on("pageerror", lambda e: self.failures.append(f"uncaught: {str(e)[:300]}"))

    def visible_failures(self) -> list[str]:
        body = self.page.inner_text("body")
        return [*self.failures, *(f"on screen: {m}" for m in FAILURE_MARKS if m in body)]


def launch(playwright, chromium: str = CHROMIUM):
    return playwright.chromium.launch(
        executable_path=chromium, args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
    )


def open_study(browser, viewer: str, study_uid: str) -> Session:
    """The viewer on one study, its first-visit tour and investigational-use banner dismissed."""
    session = Session(browser.new_page(viewport={"width": 1400, "height": 860}))
    session.watch()
    page = session.page
    page.goto(f"{viewer}/viewer?StudyInstanceUIDs={study_uid}")
    page.get_by_text("Skip all").click(timeout=90_000)
    page.get_by_text("Confirm and hide").click()
    return session


def open_series(session: Session, description: str, settle_s: float = 6.0) -> None:
    """Double-click the series (thumbnail) whose description starts with ``description``."""
    session.page.get_by_text(description).first.dblclick()
    time.sleep(settle_s)


def track_measurements(session: Session) -> list[str]:
    """After an SR of measurements is opened: accept OHIF's offer to track them (it hydrates the
    SR into its own tools, drawn on the CT), open the measurement panel, and return its rows."""
    page = session.page
    page.get_by_role("button", name="Yes").click(timeout=60_000)
    time.sleep(4)
    rows = page.locator("[data-cy='data-row']")
    if not rows.count():  # the right-hand panel's measurement tab (fixed viewport size)
        page.mouse.click(1381, 135)
    rows.first.wait_for(timeout=30_000)
    return rows.all_inner_texts()


def drawn_annotations(session: Session) -> int:
    """How many annotations the viewport's SVG layer draws on the image shown now."""
    return session.page.locator("svg.svg-layer [data-annotation-uid]").count()


def overlay_segmentation(session: Session, description: str = "AI segmentation") -> None:
    """Load the SEG as an overlay on the viewport's CT ("open this Segmentation?" - yes)."""
    session.page.get_by_text(description).first.dblclick()
    session.page.get_by_role("button", name="Yes").click(timeout=60_000)
    time.sleep(5)


def jump_to_measurement(session: Session, row: int = 0) -> None:
    """Click a row of the measurement panel: OHIF shows the image that measurement is drawn on."""
    session.page.locator("[data-cy='data-row']").nth(row).click()
    time.sleep(3)
