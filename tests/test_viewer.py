"""The OHIF viewer served by Orthanc under /ohif/, in headless Chromium (Debian ``chromium``).

The browser opens the OHIF URL of the processed sample study (with the SEG as the initial
series, so OHIF overlays it on the MR), logged in through an ``Authorization`` header. The
test checks the DOM (the study's series are listed; the segmentation panel lists "Spinal
cord", and clicking it brings the slice at the segment's centre), the DICOMweb requests the
page made to Orthanc (QIDO-RS of the study, WADO-RS of the SEG) and that the screenshot shows
the coloured overlay on the grey MR. ``SCI_DOCS_SCREENSHOT=docs/img/ohif-seg.png`` also saves
the screenshot there.

Issue 37 item 5, the reading room: the "open in OHIF" link of the status page opens the node's SR
in OHIF's SR view (not an empty viewport) on the slice with the most cord, or, with lesions, on the
largest lesion; each finding is outlined there with every value of the report beside it, and the
view's arrows step from lesion to lesion, then to the cord. The expected slices are computed here
from the node's SEG, independently of the node's own choice. The lesions are written into a copy
of the sample series (tests/lesion_support.py) sent to a stack of its own.
``SCI_DOCS_SCREENSHOT_SR=docs/img/ohif-sr.png`` saves that screenshot.

A second series of 99 x 99 images (a crop of the committed axial T2w series: Rows x Columns not
a multiple of 8, so a BINARY SEG's frames would not start on a byte boundary) goes through the
same stack: its SEG must be FRACTIONAL, pass dciodvfy, answer 200 to every DICOMweb
``/frames/N`` and be overlaid by OHIF.
"""
from __future__ import annotations

import html
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from lesion_support import Lesion, cord_from_seg, with_lesions
from PIL import Image
from pydicom.uid import generate_uid
from scipy import ndimage as ndi

from sci_node.pipeline.series import SeriesVolume, read_series

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


# -- issue 37 item 5: the report (SR) in OHIF ----------------------------------------------------

#: the image OHIF's viewport shows (its SOP Instance UID) and the text lines drawn beside the findings
VIEWER_STATE = r"""(() => {
  const viewport = window.cornerstone?.getRenderingEngines?.()[0]?.getViewports?.()[0];
  const imageId = viewport?.getCurrentImageId?.() || '';
  return { sop: (imageId.match(/instances\/([0-9.]+)/) || [])[1] || null,
           lines: [...document.querySelectorAll('svg text tspan')].map(t => t.textContent) };
})()"""


@dataclass(frozen=True)
class LesionStudy:
    """The sample series with two lesions written in, processed by a stack of its own."""

    stack: StackProc
    study: str
    files: list[Path]
    summary: dict[str, Any]


def _download(stack: StackProc, orthanc_series: str, path: Path) -> Path:
    client = stack.client()
    path.write_bytes(client.get_instances_id_file(client.get_series_id(orthanc_series)["Instances"][0]))
    return path


@pytest.fixture(scope="module")
def lesion_study(processed: ProcessedStudy, own_stack: StackProc,
                 tmp_path_factory: pytest.TempPathFactory) -> LesionStudy:
    tmp = tmp_path_factory.mktemp("lesion-study")
    vol = read_series(SAMPLE)
    cord = cord_from_seg(_download(processed.stack, processed.seg_series[0], tmp / "sample-seg.dcm"), vol)
    files, _ = with_lesions(SAMPLE, vol, cord, [Lesion(0.3, 6.0, 2.5), Lesion(0.65, 4.0, 2.0)], tmp / "in")
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    own_stack.storescu(files)
    wait_for(lambda: bool(own_stack.find_series(study, "SR")), 600, interval=1, what="the SR of the lesion series")
    (job,) = own_stack.sci_node_jobs(f"/sci-node/studies/{study}/jobs")["jobs"]
    return LesionStudy(own_stack, study, files, job["result"]["summary"])


def status_page_link(stack: StackProc, study: str) -> str:
    """The "open in OHIF" link of the plugin's status page for the node's job of ``study``."""
    page = httpx.get(stack.url + "/sci-node", auth=(USER, PASSWORD), trust_env=False, timeout=60).text
    links = [html.unescape(h) for h in re.findall(r'href="(/ohif/viewer\?[^"]*)"', page)]
    mine = [h for h in links if f"StudyInstanceUIDs={study}" in h and "initialSeriesInstanceUID=" in h]
    assert mine, f"no OHIF link to the report of study {study} on the status page: {links}"
    return stack.url + mine[0]


def most_voxels(stack: StackProc, study: str, files: list[Path], tmp: Path) -> dict[str, str]:
    """The SOP Instance UID of the slice with the most voxels of every finding, read from the node's
    SEG (downloaded into ``tmp``): "Spinal cord", and "Lesion k" for the k-th largest 26-connected lesion."""
    vol = read_series(files)
    seg = hd.seg.segread(_download(stack, stack.find_series(study, "SEG")[0], tmp / "node-seg.dcm"))
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    px = seg.get_pixels_by_source_instance([r.sop_instance_uid for r in vol.refs], segment_numbers=numbers,
                                           skip_overlap_checks=True)
    found = {"Spinal cord": _slice_with_most(px[..., numbers.index(1)], vol)}
    if 2 in numbers:
        labels, _ = ndi.label(px[..., numbers.index(2)], structure=np.ones((3, 3, 3)))
        sizes = np.bincount(labels.ravel())[1:]
        for k, i in enumerate(np.argsort(-sizes, kind="stable"), start=1):
            found[f"Lesion {k}"] = _slice_with_most(labels == i + 1, vol)
    return found


def _slice_with_most(mask: np.ndarray, vol: SeriesVolume) -> str:
    ref = vol.refs[int(np.argmax(mask.reshape(len(mask), -1).sum(axis=1)))]
    assert ref is not None
    return ref.sop_instance_uid


def shown(browser: Browser, finding: str, timeout: float = 120) -> dict[str, Any]:
    """Wait until OHIF's SR view writes ``finding``'s lines; the viewer state then."""
    state = browser.wait_for(f"(() => {{ const s = {VIEWER_STATE}; return s.sop && "
                             f"s.lines.some(l => l.startsWith({finding + ' '!r}) || l.startsWith({finding + ':'!r}))"
                             " && s; })()", timeout)
    assert state, f"OHIF's SR view never showed {finding}: {browser.evaluate(VIEWER_STATE)}"
    return state


def block(state: dict[str, Any], finding: str, expected: list[str]) -> list[str]:
    """The lines OHIF writes for ``finding``, as many as ``expected``: every finding drawn on the slice writes
    its own block (the cord's and a lesion's share a slice when the cord is widest where the lesion is)."""
    lines = state["lines"]
    start = next((i for i, line in enumerate(lines) if line.startswith((finding + " ", finding + ":"))), len(lines))
    return lines[start:start + len(expected)]


def js1(value: float) -> str:
    """A number as the viewer writes it: the report's value (3 decimals) to one decimal."""
    v = math.floor(round(value, 3) * 10 + 0.5) / 10
    return str(int(v)) if v.is_integer() else str(v)


def finding_lines(summary: dict[str, Any], finding: str) -> list[str]:
    """What the SR view must write beside ``finding``: every value of the report, named."""
    if finding == "Spinal cord":
        csa = summary["csa_mm2"]
        return ["Spinal cord: level not assessed", f"Lesions: {summary['lesion_count']}",
                f"Volume: {js1(summary['cord_volume_mm3'])} mm³",
                f"Length along cord: {js1(summary['cord_length_mm'])} mm",
                "CSA mean/minimum/maximum/median: " + " / ".join(js1(csa[k]) for k in ("mean", "min", "max", "median"))
                + " mm²"]
    les = next(r for r in summary["lesions"] if f"Lesion {r['id']}" == finding)
    levels = ", ".join(f"{name} vertebra" for name in les.get("vertebral_levels") or []) or "level not assessed"
    return [f"{finding} of {summary['lesion_count']}: {levels}", f"Volume: {js1(les['volume_mm3'])} mm³",
            f"Length along cord: {js1(les['length_along_cord_mm'])} mm",
            f"Confidence: {js1(100.0 * les['confidence'])} %"]


def viewport_drawn(png: Path) -> tuple[float, int]:
    """Mean grey level of the viewport (an empty one is black) and its bright green pixels (the
    active finding's outline and text in OHIF's SR view)."""
    view = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)[70:-70, 300:1340]
    green = (view[..., 1] > 200) & (view[..., 0] < 80) & (view[..., 2] < 80)
    return float(view.mean()), int(green.sum())


def test_report_link_opens_sr_view_on_largest_lesion_and_steps_to_each_finding(lesion_study: LesionStudy,
                                                                                tmp_path: Path) -> None:
    ls = lesion_study
    assert ls.summary["lesion_count"] == 2, ls.summary["lesions"]  # both inserted lesions were found
    url = status_page_link(ls.stack, ls.study)
    assert f"initialSeriesInstanceUID={ls.summary['key_images']['sr_series_uid']}" in url
    expected = most_voxels(ls.stack, ls.study, ls.files, tmp_path)
    shot, states = tmp_path / "ohif-sr.png", {}
    with Browser(tmp_path / "chromium-sr") as browser:
        browser.send("Runtime.enable")
        browser.open_ohif(url, USER, PASSWORD, before_load=HIDE_NAGS)
        for finding in ("Lesion 1", "Lesion 2", "Spinal cord"):  # the report's reading order
            if finding != "Lesion 1":
                assert browser.click("[data-cy=viewport-action-arrows-right] svg"), "no arrows in the SR view"
            states[finding] = shown(browser, finding)
            if finding == "Lesion 1":
                time.sleep(2)  # the last tiles, for the picture
                browser.screenshot(shot)
        thrown = [e["params"]["exceptionDetails"] for e in browser.events
                  if e.get("method") == "Runtime.exceptionThrown"]
    grey, green = viewport_drawn(shot)
    assert grey > 10 and green > 50, f"the SR view looks empty in {shot} (mean {grey:.1f}, {green} green pixels)"
    for finding, state in states.items():
        assert state["sop"] == expected[finding], f"{finding} is not shown on the slice where it is largest"
        want = finding_lines(ls.summary, finding)
        assert block(state, finding, want) == want, state["lines"]
    assert not thrown, thrown
    target = os.environ.get("SCI_DOCS_SCREENSHOT_SR")
    if target:
        shutil.copyfile(shot, target)


def test_report_link_without_lesions_opens_on_slice_with_most_cord(processed: ProcessedStudy,
                                                                    tmp_path: Path) -> None:
    stack, study = processed.stack, processed.study_uid
    url = status_page_link(stack, study)
    (job,) = stack.sci_node_jobs(f"/sci-node/studies/{study}/jobs")["jobs"]
    summary = job["result"]["summary"]
    assert summary["lesion_count"] == 0
    with Browser(tmp_path / "chromium-sr-cord") as browser:
        browser.open_ohif(url, USER, PASSWORD, before_load=HIDE_NAGS)
        state = shown(browser, "Spinal cord")
    assert state["sop"] == most_voxels(stack, study, SAMPLE, tmp_path)["Spinal cord"]
    want = finding_lines(summary, "Spinal cord")
    assert block(state, "Spinal cord", want) == want, state["lines"]
