"""Issue 39: OHIF shows the follow-up's "New or enlarging lesion" SEG (real stack, real pipeline, headless Chromium).

A prior study of patient FUVIEW (the committed PAM50 sagittal T2w, 2025-01-07) goes through ``sci-node stack``;
a year later the same images with one lesion written into the cord arrive as a new study. The node finds the
prior in its job history, compares, and its comparison SEG and SR land in Orthanc next to the follow-up's own
SEG and SR. OHIF opens the follow-up study with the comparison SEG as its initial series; the test asserts
the segmentation panel lists "New or enlarging lesion", that clicking the segment brings the slice where the
comparison SEG has the most voxels (computed here from the SEG), and that the viewport then shows the segment's
yellow over the grey MR (pixels counted in the screenshot; the node's own SEG, cord green and lesions red, is not
loaded), while on the slice farthest from the lesion, where the SEG is empty, no pixel is yellow.
``SCI_DOCS_SCREENSHOT_FOLLOWUP=docs/img/ohif-followup-seg.png`` saves the screenshot there.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import highdicom as hd
import numpy as np
import pydicom
import pytest
from lesion_support import as_study, cord_from_seg, follow_up_with_lesion
from PIL import Image

from sci_node.pipeline.comparison_seg import NEW_OR_ENLARGING_COLOR
from sci_node.pipeline.series import read_series

from chromium_cdp import Browser
from conftest import wait_for
from dicom_validate import dciodvfy_errors
from stack_support import PASSWORD, USER, StackProc

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SERIES = sorted((REPO / "tests" / "data" / "series" / "pam50_sag_T2w").glob("*.dcm"))
LABEL = "New or enlarging lesion"
HIDE_NAGS = ("sessionStorage.setItem('investigationalUseDialog', 'hidden');"
             "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));")
#: the SOP Instance UID of the image OHIF's first viewport shows
CURRENT_SOP = r"""(() => {
  const viewport = window.cornerstone?.getRenderingEngines?.()[0]?.getViewports?.()[0];
  const imageId = viewport?.getCurrentImageId?.() || '';
  return (imageId.match(/instances\/([0-9.]+)/) || [])[1] || null;
})()"""
#: show the image whose SOP Instance UID is %-formatted in, in OHIF's first viewport (a stack viewport)
SHOW_SOP = r"""(() => {
  const viewport = window.cornerstone?.getRenderingEngines?.()[0]?.getViewports?.()[0];
  const index = (viewport?.getImageIds?.() || []).findIndex(id => id.includes('/instances/%s/'));
  if (index < 0) { return false; }
  viewport.setImageIdIndex(index);
  return true;
})()"""
CLICK_SEGMENT = """(() => {
  const el = [...document.querySelectorAll('*')]
    .find(e => e.children.length === 0 && e.textContent.trim() === %r);
  if (el) { el.click(); }
  return !!el;
})()""" % LABEL


def _download(stack: StackProc, orthanc_series: str, path: Path) -> Path:
    client = stack.client()
    path.write_bytes(client.get_instances_id_file(client.get_series_id(orthanc_series)["Instances"][0]))
    return path


def _by_description(stack: StackProc, study: str, modality: str, text: str) -> list[str]:
    """Orthanc series ids of ``study``'s ``modality`` series whose description contains ``text``."""
    client = stack.client()
    return [s for s in stack.find_series(study, modality)
            if text in client.get_series_id(s)["MainDicomTags"].get("SeriesDescription", "")]


def yellow_pixels(png: Path) -> int:
    """Yellow pixels in the viewport (right of the study browser, left of the side panel): red and green
    both well above blue. The MR is grey, the node's other segments green and red, OHIF's accents blue."""
    view = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)[70:-70, 310:1080]
    r, g, b = view[..., 0], view[..., 1], view[..., 2]
    return int(np.count_nonzero((r - b > 60) & (g - b > 60) & (np.abs(r - g) < 60)))


@pytest.fixture(scope="module")
def followup_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProc]:
    stack = StackProc(tmp_path_factory.mktemp("orthanc-stack-fu") / "d", toml="torch_threads = 1\n").start()
    yield stack
    stack.stop()


def test_ohif_shows_the_new_or_enlarging_lesion_segment_of_a_follow_up(followup_stack: StackProc,
                                                                       tmp_path: Path) -> None:
    stack = followup_stack
    prior, _ = as_study(SERIES, tmp_path / "prior", "FUVIEW", "20250107")
    prior_study = str(pydicom.dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID)
    stack.storescu(prior)
    wait_for(lambda: bool(stack.find_series(prior_study, "SR")), 600, interval=1, what="the prior's SR in Orthanc")
    vol = read_series(prior)
    cord = cord_from_seg(_download(stack, stack.find_series(prior_study, "SEG")[0], tmp_path / "prior-seg.dcm"), vol)
    later, truth, _ = follow_up_with_lesion(prior, vol, cord, tmp_path / "later")
    study = str(pydicom.dcmread(later[0], stop_before_pixels=True).StudyInstanceUID)
    stack.storescu(later)

    cmp_segs: list[str] = []

    def comparison_in_orthanc() -> bool:
        cmp_segs[:] = _by_description(stack, study, "SEG", "new/enlarging vs 2025-01-07")
        return bool(cmp_segs) and bool(_by_description(stack, study, "SR", "comparison vs 2025-01-07"))
    wait_for(comparison_in_orthanc, 600, interval=1, what="the comparison SEG and SR in Orthanc")
    (job,) = stack.sci_node_jobs(f"/sci-node/studies/{study}/jobs")["jobs"]
    fu = job["result"]["summary"]["followup"]
    assert fu["compared"] and fu["counts"]["new"] >= 1, fu

    path = _download(stack, cmp_segs[0], tmp_path / "new-or-enlarging-seg.dcm")
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == LABEL  # in yellow, the colour the yellow pixels below are counted by
    assert list(segment.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor(*NEW_OR_ENLARGING_COLOR).value)
    later_vol = read_series(later)
    refs = [r.sop_instance_uid for r in later_vol.refs]
    px = seg.get_pixels_by_source_instance(refs, segment_numbers=[1], skip_overlap_checks=True)[..., 0]
    assert (px[truth > 0] > 0).mean() > 0.5, "the written lesion is not in the comparison SEG"
    per_slice = (px > 0).reshape(len(px), -1).sum(axis=1)
    lesion_sop = refs[int(np.argmax(per_slice))]
    empty = [k for k in range(len(refs)) if per_slice[k] == 0]
    empty_sop = refs[max(empty, key=lambda k: abs(k - int(np.argmax(per_slice))))]

    shot = tmp_path / "ohif-followup-seg.png"
    url = f"{stack.url}/ohif/viewer?StudyInstanceUIDs={study}&initialSeriesInstanceUID={seg.SeriesInstanceUID}"
    with Browser(tmp_path / "chromium-fu") as browser:
        browser.open_ohif(url, USER, PASSWORD, before_load=HIDE_NAGS)
        assert browser.wait_for("document.body.innerText.includes('SEG')", 90), "OHIF did not list the study's series"
        browser.evaluate("document.querySelector('[data-cy^=panelSegmentation]')?.click()")
        panel = browser.wait_for(f"document.body.innerText.includes({LABEL!r})", 90)
        assert panel, f"the segmentation panel does not list {LABEL!r}: {browser.evaluate('document.body.innerText')!r}"
        assert browser.evaluate(CLICK_SEGMENT)
        shown_sop = browser.wait_for(f"{CURRENT_SOP} === {lesion_sop!r} && {CURRENT_SOP}", 60)
        deadline, yellow = time.monotonic() + 120, 0
        while time.monotonic() < deadline and yellow < 100:
            time.sleep(2)
            yellow = yellow_pixels(browser.screenshot(shot))
        time.sleep(2)  # the last tiles, for the picture
        browser.screenshot(shot)
        # the control: on the slice farthest from the lesion, where the SEG is empty, no yellow
        assert browser.evaluate(SHOW_SOP % empty_sop), "OHIF's viewport does not list the series' images"
        assert browser.wait_for(f"{CURRENT_SOP} === {empty_sop!r}", 30), "OHIF did not move to the lesion-free slice"
        time.sleep(3)
        elsewhere = yellow_pixels(browser.screenshot(tmp_path / "ohif-followup-elsewhere.png"))
        requests = [e["params"]["request"]["url"] for e in browser.events
                    if e.get("method") == "Network.requestWillBeSent"]
    assert shown_sop == lesion_sop, f"OHIF shows {shown_sop}, not the new lesion's largest slice {lesion_sop}"
    assert yellow >= 100, f"no yellow 'New or enlarging lesion' overlay in {shot} ({yellow} yellow pixels)"
    assert elsewhere == 0, f"{elsewhere} yellow pixels on a slice where the comparison SEG is empty"
    assert any(f"/series/{seg.SeriesInstanceUID}" in u for u in requests if "/dicom-web/" in u), "SEG never fetched"
    target = os.environ.get("SCI_DOCS_SCREENSHOT_FOLLOWUP")
    if target:
        shutil.copyfile(shot, target)
