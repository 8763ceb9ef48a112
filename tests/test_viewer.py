"""The OHIF viewer served by Orthanc under /ohif/, in headless Chromium (Debian ``chromium``).

The browser opens the OHIF URL of the processed sample study (with the SEG as the initial
series, so OHIF overlays it on the MR), logged in through an ``Authorization`` header. The
test checks the DOM (the study's series are listed; the segmentation panel lists "Spinal
cord", and clicking it brings the slice at the segment's centre), the DICOMweb requests the
page made to Orthanc (QIDO-RS of the study, WADO-RS of the SEG) and that the screenshot shows
the coloured overlay on the grey MR. ``SCI_DOCS_SCREENSHOT=docs/img/ohif-seg.png`` also saves
the screenshot there.
"""
from __future__ import annotations

import base64
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from chromium_cdp import Browser
from stack_support import PASSWORD, SAMPLE, USER, ProcessedStudy, seg_series_uid, shared_stack

pytestmark = pytest.mark.slow

HIDE_NAGS = ("sessionStorage.setItem('investigationalUseDialog', 'hidden');"
             "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));")


CLICK_CORD_SEGMENT = """(() => {
  const el = [...document.querySelectorAll('*')]
    .find(e => e.children.length === 0 && e.textContent.trim() === 'Spinal cord');
  if (el) { el.click(); }
  return !!el;
})()"""


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> ProcessedStudy:
    return shared_stack(tmp_path_factory.mktemp("orthanc-stack"))


def overlay_pixels(png: Path) -> int:
    """Pixels in the viewport that are clearly coloured: the SEG overlay on the grey MR.

    The MR and the viewport text are grey/white; OHIF's own accents are blue. The node's
    segments are green (cord) and red (lesions), so count saturated pixels that are not
    blue-dominant, inside the viewport (right of the study browser, left of the segmentation
    panel, inside the viewport border; window 1400 px wide).
    """
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)  # (H, W, 3)
    view = rgb[70:-70, 310:1080]
    r, g, b = view[..., 0], view[..., 1], view[..., 2]
    saturated = view.max(axis=-1) - view.min(axis=-1) > 60
    bluish = (b >= r) & (b >= g)
    return int(np.count_nonzero(saturated & ~bluish))


def test_ohif_opens_study_with_seg_overlay(processed: ProcessedStudy, tmp_path: Path) -> None:
    stack, study = processed.stack, processed.study_uid
    seg_uid = seg_series_uid(stack, processed.seg_series[0])
    mr_desc = str(pydicom.dcmread(SAMPLE[0], stop_before_pixels=True).SeriesDescription)
    url = f"{stack.url}/ohif/viewer?StudyInstanceUIDs={study}&initialSeriesInstanceUID={seg_uid}"
    shot = tmp_path / "ohif-seg.png"
    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with Browser(tmp_path / "chromium-profile") as browser:
        browser.send("Page.enable")
        browser.send("Network.enable")
        browser.send("Network.setExtraHTTPHeaders", headers={"Authorization": auth})
        browser.send("Page.addScriptToEvaluateOnNewDocument", source=HIDE_NAGS)
        browser.send("Page.navigate", url=url)
        assert browser.wait_for("document.title", 30) == "OHIF Viewer"
        text = browser.wait_for(f"document.body.innerText.includes({mr_desc!r}) && "
                                "document.body.innerText.includes('SEG') && document.body.innerText", 90)
        assert text, f"OHIF did not list the study's series; page text: {browser.evaluate('document.body.innerText')!r}"
        # the segmentation panel lists the SEG's segments (segment 1 is always the cord);
        # clicking the segment makes OHIF jump to the slice at its centre
        browser.evaluate("document.querySelector('[data-cy=panelSegmentation-btn]')?.click()")
        panel = browser.wait_for("document.body.innerText.includes('Spinal cord')", 60)
        browser.evaluate(CLICK_CORD_SEGMENT)
        deadline, overlay = time.monotonic() + 120, 0
        while time.monotonic() < deadline and overlay < 50:
            time.sleep(2)
            overlay = overlay_pixels(browser.screenshot(shot))
        time.sleep(2)  # let the last tiles render for the picture
        browser.screenshot(shot)
        requests = [e["params"]["request"]["url"] for e in browser.events
                    if e.get("method") == "Network.requestWillBeSent"]
        statuses = {e["params"]["response"]["url"]: e["params"]["response"]["status"] for e in browser.events
                    if e.get("method") == "Network.responseReceived"}
    assert overlay >= 50, f"no segmentation overlay visible in {shot} ({overlay} coloured pixels)"
    assert panel, "OHIF's segmentation panel does not list the 'Spinal cord' segment"
    dicomweb = [u for u in requests if "/dicom-web/" in u]
    assert any("/dicom-web/studies?" in u or f"/dicom-web/studies/{study}/series?" in u for u in dicomweb), dicomweb
    assert any(f"/series/{seg_uid}" in u for u in dicomweb), "the SEG was never fetched"
    assert all(status < 400 for u, status in statuses.items() if "/dicom-web/" in u or "/ohif/" in u), \
        {u: s for u, s in statuses.items() if s >= 400}
    target = os.environ.get("SCI_DOCS_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)
