"""OHIF opens the node's SEG with the segmentation editing tools and store-to-server enabled.

Headless Chromium on the session's shared stack (the processed sample study): the labelmap
segmentation panel lists "Spinal cord" with "Add Segment", the Brush and Eraser tools are in
the panel's toolbox, OHIF's ``panelSegmentation.disableEditing`` is off, and the active data
source (Orthanc's DICOMweb) supports STOW-RS and has a store function, which OHIF's
"Export > DICOM SEG" (command ``storeSegmentation``) uses. A browser test cannot paint with a
brush; tests/test_corrections.py stores the corrected SEG by STOW-RS instead.
``SCI_DOCS_SCREENSHOT_EDIT=docs/img/ohif-seg-edit.png`` saves the screenshot for the docs.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from chromium_cdp import Browser
from stack_support import PASSWORD, USER, ProcessedStudy, seg_series_uid, shared_stack
from test_viewer import HIDE_NAGS

pytestmark = pytest.mark.slow

CAPABILITIES = """(() => {
  const ds = window.extensionManager?.getActiveDataSource?.()?.[0];
  const cfg = ds?.getConfig?.() || {};
  const cust = window.services?.customizationService;
  return {
    brush: !!document.querySelector('[data-cy=Brush-btn]'),
    eraser: !!document.querySelector('[data-cy=Eraser-btn]'),
    addSegment: document.body.innerText.includes('Add Segment'),
    editingDisabled: cust ? cust.getCustomization('panelSegmentation.disableEditing') : null,
    supportsStow: cfg.supportsStow === true,
    qidoRoot: cfg.qidoRoot || null,
    storeDicom: typeof ds?.store?.dicom === 'function',
    storeCommand: !!window.commandsManager?.getCommand?.('storeSegmentation', 'CORNERSTONE'),
  };
})()"""


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> ProcessedStudy:
    return shared_stack(tmp_path_factory.mktemp("orthanc-stack"))


def test_ohif_opens_node_seg_with_editing_and_store(processed: ProcessedStudy, tmp_path: Path) -> None:
    stack, study = processed.stack, processed.study_uid
    seg_uid = seg_series_uid(stack, processed.seg_series[0])
    url = f"{stack.url}/ohif/viewer?StudyInstanceUIDs={study}&initialSeriesInstanceUID={seg_uid}"
    shot = tmp_path / "ohif-seg-edit.png"
    with Browser(tmp_path / "chromium") as browser:
        browser.open_ohif(url, USER, PASSWORD, before_load=HIDE_NAGS)
        assert browser.wait_for("document.body.innerText.includes('SEG')", 90)
        browser.evaluate("document.querySelector('[data-cy=panelSegmentationWithToolsLabelMap-btn]')?.click()")
        assert browser.wait_for("document.body.innerText.includes('Spinal cord')", 90), \
            browser.evaluate("document.body.innerText")
        caps = browser.wait_for(f"(() => {{ const c = {CAPABILITIES}; return c.brush && c.storeDicom && c; }})()", 30)
        caps = caps or browser.evaluate(CAPABILITIES)
        time.sleep(2)
        browser.screenshot(shot)
        requests = [e["params"]["request"]["url"] for e in browser.events
                    if e.get("method") == "Network.requestWillBeSent"]
    assert caps["brush"] and caps["eraser"] and caps["addSegment"], caps
    assert caps["editingDisabled"] is False, caps
    assert caps["supportsStow"] and caps["storeDicom"] and caps["storeCommand"], caps
    assert caps["qidoRoot"] == "/dicom-web", caps  # stored to the same Orthanc data source
    assert any(u.endswith("/ohif/customizations/segmentation/segmentationEditing.jsonc") for u in requests)
    target = os.environ.get("SCI_DOCS_SCREENSHOT_EDIT")
    if target:
        shutil.copyfile(shot, target)
