"""The OHIF viewer served by Orthanc under /ohif/, in headless Chromium (Debian ``chromium``).

The browser opens the OHIF URL of the processed sample study (with the SEG as the initial
series, so OHIF overlays it on the MR), logged in through an ``Authorization`` header. The
test checks the DOM (the study's series are listed; the segmentation panel lists "Spinal
cord", and clicking it brings the slice at the segment's centre), the DICOMweb requests the
page made to Orthanc (QIDO-RS of the study, WADO-RS of the SEG) and that the screenshot shows
the coloured overlay on the grey MR. ``SCI_DOCS_SCREENSHOT=docs/img/ohif-seg.png`` also saves
the screenshot there.

A second series of 99 x 99 images (a crop of the committed axial T2w series: Rows x Columns not
a multiple of 8, so a BINARY SEG's frames would not start on a byte boundary) goes through the
same stack: its SEG must be FRACTIONAL, pass dciodvfy, answer 200 to every DICOMweb
``/frames/N`` and be overlaid by OHIF.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from chromium_cdp import Browser
from conftest import wait_for
from dicom_validate import dciodvfy_errors
from stack_support import PASSWORD, SAMPLE, USER, ProcessedStudy, StackProc, seg_series_uid, shared_stack

AXIAL = Path(__file__).resolve().parent / "data" / "series" / "unf01_axial_T2w"

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


def crop_series(src: Path, out: Path, top: int, left: int, size: int) -> list[Path]:
    """The DICOM files of ``src`` cropped to ``size`` x ``size`` from (row ``top``, column ``left``).

    Image Position (Patient) moves to the new first pixel, so the crop keeps its place in the
    patient; new study, series and SOP Instance UIDs (a study of its own).
    """
    out.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient]) + left * col_mm * iop[:3] + top * row_mm * iop[3:]
        arr = np.ascontiguousarray(ds.pixel_array[top:top + size, left:left + size])
        ds.PixelData, (ds.Rows, ds.Columns) = arr.tobytes(), arr.shape
        ds.ImagePositionPatient = [round(float(v), 5) for v in ipp]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f.name, enforce_file_format=True)
        paths.append(out / f.name)
    return paths


def open_in_ohif(stack: StackProc, study: str, seg_uid: str, shot: Path, series_text: str,
                 ) -> tuple[int, bool, list[str], dict[str, int]]:
    """Open ``study`` in OHIF with the SEG ``seg_uid`` as initial series, show its cord segment.

    Returns the overlay pixel count of the last screenshot (saved at ``shot``), whether the
    segmentation panel listed "Spinal cord", the URLs the page requested and their statuses.
    """
    url = f"{stack.url}/ohif/viewer?StudyInstanceUIDs={study}&initialSeriesInstanceUID={seg_uid}"
    with Browser(shot.parent / f"chromium-{shot.stem}") as browser:
        browser.open_ohif(url, USER, PASSWORD, before_load=HIDE_NAGS)
        text = browser.wait_for(f"document.body.innerText.includes({series_text!r}) && "
                                "document.body.innerText.includes('SEG') && document.body.innerText", 90)
        assert text, f"OHIF did not list the study's series; page text: {browser.evaluate('document.body.innerText')!r}"
        # the segmentation panel lists the SEG's segments (segment 1 is always the cord);
        # clicking the segment makes OHIF jump to the slice at its centre
        browser.evaluate("document.querySelector('[data-cy^=panelSegmentation]')?.click()")
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
    return overlay, bool(panel), requests, statuses


def test_ohif_opens_study_with_seg_overlay(processed: ProcessedStudy, tmp_path: Path) -> None:
    stack, study = processed.stack, processed.study_uid
    seg_uid = seg_series_uid(stack, processed.seg_series[0])
    mr_desc = str(pydicom.dcmread(SAMPLE[0], stop_before_pixels=True).SeriesDescription)
    shot = tmp_path / "ohif-seg.png"
    overlay, panel, requests, statuses = open_in_ohif(stack, study, seg_uid, shot, mr_desc)
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


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProc]:
    """A stack of its own (real pipeline): the shared one must see only the sample series."""
    stack = StackProc(tmp_path_factory.mktemp("orthanc-stack-99") / "d").start()
    yield stack
    stack.stop()


def test_ohif_overlays_seg_of_99x99_series_and_every_frame_is_served(own_stack: StackProc, tmp_path: Path) -> None:
    stack = own_stack
    # 99 x 99 = 9801 pixels: a bit-packed (BINARY) frame would end mid-byte
    mr = crop_series(AXIAL, tmp_path / "crop99", top=37, left=13, size=99)
    study = str(pydicom.dcmread(mr[0], stop_before_pixels=True).StudyInstanceUID)
    stack.storescu(mr)
    segs: list[str] = []

    def seg_arrived() -> bool:
        segs[:] = stack.find_series(study, "SEG")
        return bool(segs)

    wait_for(seg_arrived, 600, interval=1, what="the SEG of the 99 x 99 series")
    client = stack.client()
    (instance,) = client.get_series_id(segs[0])["Instances"]
    path = tmp_path / "seg99.dcm"
    path.write_bytes(client.get_instances_id_file(instance))
    seg = pydicom.dcmread(path)
    assert (seg.Rows, seg.Columns) == (99, 99)
    assert seg.SegmentationType == "FRACTIONAL" and int(seg.MaximumFractionalValue) == 1
    assert seg.BitsAllocated == 8 and set(np.unique(seg.pixel_array)) <= {0, 1}
    assert dciodvfy_errors(path) == []
    base = (f"{stack.url}/dicom-web/studies/{study}/series/{seg.SeriesInstanceUID}"
            f"/instances/{seg.SOPInstanceUID}/frames")
    accept = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
    with httpx.Client(auth=(USER, PASSWORD), trust_env=False, timeout=30, headers=accept) as http:
        answers = {n: http.get(f"{base}/{n}").status_code for n in range(1, int(seg.NumberOfFrames) + 1)}
    assert set(answers.values()) == {200}, answers
    overlay, panel, requests, statuses = open_in_ohif(stack, study, str(seg.SeriesInstanceUID),
                                                      tmp_path / "ohif-seg99.png", "T2 TSE AX cervical")
    assert overlay >= 50, f"no overlay of the 99 x 99 SEG visible ({overlay} coloured pixels)"
    assert panel, "OHIF's segmentation panel does not list the 'Spinal cord' segment"
    assert any(str(seg.SeriesInstanceUID) in u for u in requests if "/dicom-web/" in u), "the SEG was never fetched"
    assert all(status < 400 for u, status in statuses.items() if "/dicom-web/" in u), \
        {u: s for u, s in statuses.items() if s >= 400}
