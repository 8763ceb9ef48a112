"""Vertebral levels (sci_node.imaging.levels) on synthetic sagittal columns whose disc positions are known: the global
fit keeps every level below a faint disc and a spurious band, a column with lumbar spacings stays unknown, and a field
of view cut below C2 stays unknown (a disc-free stretch with discs above it; a disc near the upper edge of the view);
a band inside a tall C2 (the C1/C2 junction, 16 mm above C2-C3) near the view's upper edge is refused, not counted."""
from __future__ import annotations

import numpy as np

from sci_node.imaging.levels import SPACING_MM, label_levels

#: index (z, y, x) -> LPS mm: z runs up (S), y runs back (P), x runs left (L); 1 mm voxels
M = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
CORD_Y, CORD_X = 48, 5


def _column(discs_z: dict[int, float], top: int, faint: dict[int, float] | None = None,
            extra_z: tuple[float, ...] = (), extra_value: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``(image, cord)`` ``(Z, 64, 11)``: cord (0.3), CSF in front (1.0, 3-6 mm), vertebral bodies (0.4, 7-40 mm in
    front), a dark 4 mm band (0.1) at each disc's ``z`` (mm; ``faint``: label -> band intensity instead) and at
    ``extra_z`` (bands that are no disc, ``extra_value`` dark)."""
    z = np.arange(top, dtype=np.float64)[:, None]
    d = (CORD_Y - np.arange(64, dtype=np.float64))[None, :]  # mm in front of the cord's centre
    img = np.where(np.abs(d) <= 3, 0.3, 0.05) * np.ones_like(z)
    img = np.where((d > 3) & (d <= 6), 1.0, img)
    body = (d > 6) & (d <= 40)
    img = np.where(body, 0.4, img)
    faint = faint or {}
    bands = [(zc, faint.get(label, 0.1)) for label, zc in discs_z.items()] + [(zc, extra_value) for zc in extra_z]
    for zc, value in bands:
        img = np.where(body & (np.abs(z - zc) <= 2.0), value, img)
    image = np.repeat(img[:, :, None], 11, axis=2).astype(np.float32)
    yy, xx = np.mgrid[0:64, 0:11]
    disk = (yy - CORD_Y) ** 2 + (xx - CORD_X) ** 2 <= 9
    cord = np.repeat(disk[None], top, axis=0).astype(np.uint8)
    return image, cord


def _disc_positions(c2c3_z: float, scale: float, last_label: int, lumbar: bool = False) -> dict[int, float]:
    out, z = {3: c2c3_z}, c2c3_z
    for label in range(3, last_label):
        z -= 35.0 * scale if lumbar else SPACING_MM[label] * scale
        out[label + 1] = z
    return out


def test_faint_disc_and_spurious_band_do_not_shift_the_levels_below() -> None:
    truth = _disc_positions(212.0, 0.9, 13)  # C2-C3 ... T4-T5 (label 13), 0.9 x the PAM50 spacings
    # T2-T3 (label 10) barely darker than the marrow; a clear spurious band 6 mm above it (a greedy count takes it)
    image, cord = _column(truth, 250, faint={10: 0.36}, extra_z=(truth[10] + 6.0,))
    res = label_levels(image, cord, M)
    assert res.known, res.unknown_reason
    found = {d.label: d for d in res.discs}
    assert set(range(3, 13)) <= set(found), [d.name for d in res.discs]
    for label in range(3, 13):  # T2-T3 itself is pulled towards the spurious band, within the 6 mm target
        tol = 6.0 if label == 10 else 3.0
        assert abs(found[label].lps_mm[2] - truth[label]) <= tol, (found[label].name, found[label].lps_mm, truth[label])
    assert 0.84 <= res.extras["scale"] <= 0.96
    # cord voxels half way between two discs carry the vertebra between them (T3: between T2-T3 and T3-T4)
    for label in (4, 9, 11):
        zmid = int(round(0.5 * (truth[label] + truth[label + 1])))
        assert res.level_map[zmid, CORD_Y, CORD_X] == label


def test_column_with_lumbar_spacings_is_unknown() -> None:
    truth = _disc_positions(212.0, 1.0, 8, lumbar=True)  # six 35 mm gaps under a disc-free top: no cervical column
    image, cord = _column(truth, 250)
    res = label_levels(image, cord, M)
    assert not res.known and "no anchor" in (res.unknown_reason or "")
    assert not res.level_map.any()



def _cut(truth: dict[int, float], top: int, faint: dict[int, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The column of ``truth`` with the field of view (image and cord) ending at ``z = top`` mm."""
    return _column({label: z for label, z in truth.items() if z < top - 1}, top, faint=faint)


def test_a_disc_free_stretch_with_discs_above_it_is_no_c2() -> None:
    # the view starts inside C4 (C2-C3, C3-C4 cut off); C6-C7 (label 7) is invisible, so C7-T1 has 29 mm of
    # disc-free column above it, more than the C2 test asks at this spacing; but C4-C5 and C5-C6 lie above that: the
    # column goes on (the anchor before this check took a thoracic disc for C2-C3)
    truth = _disc_positions(212.0, 0.9, 14)
    image, cord = _cut(truth, int(truth[5]) + 12, faint={7: 0.4})
    res = label_levels(image, cord, M)
    assert not res.known, [d.name for d in res.discs]
    assert "no anchor" in (res.unknown_reason or "")


def test_a_disc_near_the_upper_edge_of_the_view_still_counts() -> None:
    # the view ends 6-8 mm above a faint C3-C4 (C2-C3 cut off): the 5 mm second difference sees that band only from
    # below, at a fraction of its strength; counted at a quarter of the candidate's (not half), it still rules out
    # C4-C5 as C2-C3 (the anchor before this took C4-C5 for C2-C3 in all three views)
    truth = _disc_positions(212.0, 0.85, 13)
    for above, band in ((6, 0.2), (7, 0.25), (8, 0.3)):
        image, cord = _cut(truth, int(truth[4]) + above, faint={4: band})
        res = label_levels(image, cord, M)
        assert not res.known, (above, [d.name for d in res.discs])


def test_full_column_still_anchored_with_c2_shown() -> None:
    # the same column with 30 mm of C2 in view: C2-C3 is found (the new checks do not refuse a column that shows C2)
    truth = _disc_positions(212.0, 0.8, 13)
    image, cord = _cut(truth, 242)
    res = label_levels(image, cord, M)
    assert res.known, res.unknown_reason
    assert res.discs[0].name == "C2-C3" and abs(res.discs[0].lps_mm[2] - truth[3]) <= 3.0


def _c2_with_junction(top_above_band: float, band: float = 0.25) -> tuple[dict[int, float], float, int]:
    """Discs C2-C3 ... T4-T5 (0.9 x PAM50), the C1/C2 junction band 16 mm above C2-C3 (inside the tall C2 block: no
    disc above C2-C3 in the column), and the view's upper edge ``top_above_band`` mm above that band."""
    truth = _disc_positions(212.0, 0.9, 13)
    junction = truth[3] + 16.0
    return truth, junction, int(junction + top_above_band)


def _named_wrongly(res, truth: dict[int, float]) -> list[str]:
    """Discs found whose nearest true disc (within 8 mm, as the bench's --fov-cuts scores) has another name."""
    out = []
    for d in res.discs:
        label = min(truth, key=lambda n: abs(truth[n] - d.lps_mm[2]))
        if label != d.label and abs(truth[label] - d.lps_mm[2]) < 8.0:
            out.append(d.name)
    return out


def test_junction_band_inside_c2_near_the_view_top_is_refused_not_counted() -> None:
    # sub-errsm23's geometry: a band 16 mm above C2-C3 (as far as C2-C3 lies above C3-C4), the cord ending 7 mm above
    # it. Taken for a disc, it would make C2-C3 "C3-C4" and every level one too low; the disc evidence cannot tell the
    # two apart here (docs/benchmarks.md section 5), so the levels must be unknown, never one level off
    for band in (0.1, 0.25):
        truth, junction, top = _c2_with_junction(7.0, band)
        image, cord = _column({n: z for n, z in truth.items() if z < top - 1}, top, extra_z=(junction,),
                              extra_value=band)
        res = label_levels(image, cord, M)
        assert not res.known, [d.name for d in res.discs]
        assert not _named_wrongly(res, truth)


def test_cut_views_of_a_c2_with_junction_band_are_never_named_wrongly() -> None:
    # the same column cut at every height from 60 mm below C2-C3 to 7 mm above the junction band (as --fov-cuts):
    # each view is unknown, or every disc it names is named right. Views ending 0-6 mm above a disc are left out: a disc
    # within 5 mm of the cord's upper end is not seen at all (the known blind zone, module doc step 3)
    truth, junction, _ = _c2_with_junction(7.0)
    for top in range(int(truth[3]) - 60, int(junction) + 8, 3):
        if any(0 <= top - z <= 6 for z in truth.values()):
            continue
        inside = (junction,) if junction < top - 1 else ()
        image, cord = _column({n: z for n, z in truth.items() if z < top - 1}, top, extra_z=inside, extra_value=0.25)
        res = label_levels(image, cord, M)
        assert not _named_wrongly(res, truth), (top - truth[3], [d.name for d in res.discs])
