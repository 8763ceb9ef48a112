"""Held-out check of the whole ``sci-node infer`` path with the LOSO fold networks.

The shipped cord model trained on every labelled subject, so a Dice on those subjects says
nothing about generalisation. The trainer's ``--keep-folds DIR`` writes each leave-one-subject-out
fold network as a full artefact (``DIR/<held-out group>/{weights.pt,card.json}``); this module
runs, per fold and per held-out case of that fold:

1. the case's image → a real MR DICOM series in its native slice orientation
   (``scripts/make_sample_series.py``: exact LPS geometry, acquisition headers from the BIDS
   sidecar when there is one);
2. a temporary copy of the repo's model registry in which the fold artefact is registered and
   activated with the real CLI (``sci-node models --models-dir TMP add FOLD --activate``);
3. the real batch command as a subprocess (``sci-node infer SERIES --out OUT --models-dir TMP``);
4. the cord mask read back from the written DICOM-SEG (frames by source instance, segment 1),
   scored against the manual mask resampled onto the series grid (nearest neighbour, identity).

Usage::

    .venv/bin/python -m trainer.infer_check --folds DIR [--data ../shared/data/spine]
        [--work TMPDIR] [--json-out F]

Prints one markdown table (held-out subject, contrast, fold model version, status/routing,
cord Dice from the SEG, the fold's own evaluation Dice at its inference threshold).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np
import structlog

from sci_node.errors import DataError, ModelError, SciNodeError

log = structlog.get_logger(__name__)

REPO = Path(__file__).resolve().parents[2]
SAMPLE_SCRIPT = REPO / "scripts" / "make_sample_series.py"
VENV_BIN = Path(sys.executable).parent

#: File-name contrast entity → ``make_sample_series.CONTRASTS`` key (the fallback headers; a BIDS
#: sidecar's real TE/TR/TI/flip, ScanningSequence, SequenceVariant, ScanOptions and
#: MRAcquisitionType override them). The MT-on acquisition is a 3-D spoiled gradient echo
#: (sidecar: GR, MTC_SP, ScanOptions MT, TE 3.1 ms, TR 35 ms, flip 9°): the spoiled-GRE template
#: is its honest base, and its sidecar marks the MT pulse (SequenceVariant MTC).
CONTRAST_HEADERS = {"T1w": "T1w", "T2w": "T2w", "T2star": "T2starw", "acq-MTon_MTS": "T2starw",
                    "acq-MToff_MTS": "T2starw"}
#: Slice-normal RAS letter → ``make_sample_series.VIEWS`` key.
VIEW_OF_AXIS = {"L": "sagittal", "R": "sagittal", "S": "axial", "I": "axial"}


@dataclass(frozen=True)
class FoldArtefact:
    """One LOSO fold network written by ``--keep-folds``.

    Attributes
    ----------
    path : Path
        Artefact folder (``weights.pt`` + ``card.json``).
    version : str
        ``card["version"]``, e.g. ``0.2.0+loso-sub-unf01``.
    held_out : str
        The held-out group.
    val : tuple[str, ...]
        Case keys (``<subject>_<contrast>``) the fold never trained on.
    card : dict
        The whole model card.
    """

    path: Path
    version: str
    held_out: str
    val: tuple[str, ...]
    card: dict[str, Any]


@dataclass
class CaseResult:
    """Outcome for one held-out case (one row of the table)."""

    held_out: str
    case: str
    subject: str
    contrast: str
    fold_version: str
    view: str
    series_dir: str
    status: str = "not run"
    routing: str = "-"
    reason: str | None = None
    seg: str | None = None
    dice_seg: float | None = None
    dice_fold_eval: float | None = None
    fold_threshold: float | None = None


def load_folds(folds_dir: Path) -> list[FoldArtefact]:
    """Read every fold artefact (sub-folder with ``card.json``) under ``folds_dir``.

    Raises
    ------
    DataError
        ``folds_dir`` missing or holding no fold folder.
    ModelError
        A fold folder without ``card.json``, or a card without ``training.splits.fold``.
    """
    folds_dir = Path(folds_dir)
    if not folds_dir.is_dir():
        raise DataError(f"fold directory {str(folds_dir)!r} does not exist")
    subdirs = sorted(p for p in folds_dir.iterdir() if p.is_dir())
    if not subdirs:
        raise DataError(f"fold directory {str(folds_dir)!r} holds no fold folder (expected <group>/card.json)")
    folds = []
    for d in subdirs:
        card_path = d / "card.json"
        if not card_path.is_file():
            raise ModelError(f"fold folder {str(d)!r} has no card.json")
        card = json.loads(card_path.read_text(encoding="utf-8"))
        fold = card.get("training", {}).get("splits", {}).get("fold")
        if not isinstance(fold, dict) or not fold.get("val"):
            raise ModelError(f"card {str(card_path)!r} has no training.splits.fold with a 'val' list "
                             "(not a --keep-folds artefact?)")
        folds.append(FoldArtefact(d, str(card["version"]), str(fold["held_out"]), tuple(fold["val"]), card))
    return folds


def load_sample_module() -> ModuleType:
    """Import ``scripts/make_sample_series.py`` (not a package) by path."""
    spec = importlib.util.spec_from_file_location("make_sample_series", SAMPLE_SCRIPT)
    if spec is None or spec.loader is None:
        raise DataError(f"cannot load {str(SAMPLE_SCRIPT)!r}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_sample_series", mod)  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def native_view(image: Path) -> str:
    """``"axial"`` or ``"sagittal"``: the view of the NIfTI's acquired slices.

    The slice axis is the voxel axis with the largest spacing (the last one on ties, the NIfTI
    convention); its dominant RAS direction names the view.

    Raises
    ------
    DataError
        Coronal slices (``make_sample_series`` writes axial and sagittal series only).
    """
    import nibabel as nib

    img: Any = nib.load(str(image))
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    axis = int(np.flatnonzero(zooms >= zooms.max() - 1e-3)[-1])
    letter = nib.aff2axcodes(img.affine)[axis]
    if letter not in VIEW_OF_AXIS:
        raise DataError(f"image {str(image)!r} has coronal slices (axis {axis} along {letter!r}); "
                        "only axial and sagittal series can be written")
    return VIEW_OF_AXIS[letter]


def write_case_series(case: Any, out_dir: Path, sample: ModuleType, number: int) -> str:
    """Write ``case.image`` as an MR DICOM series in ``out_dir``; return its view.

    The manual mask is not copied into ``out_dir`` (the batch command must see the series only).

    Raises
    ------
    DataError
        Unknown contrast entity or coronal source slices.
    """
    contrast = CONTRAST_HEADERS.get(case.contrast)
    if contrast is None:
        raise DataError(f"case {case.key!r}: no MR header template for contrast {case.contrast!r} "
                        f"(known: {', '.join(CONTRAST_HEADERS)})")
    view = native_view(case.image)
    desc = f"{case.contrast} {'AX' if view == 'axial' else 'SAG'} {case.subject} (held out)"[:64]
    spec = sample.SeriesSpec(name=f"infer-check-{case.key}", source=Path(case.image), out_dir=out_dir,
                             contrast=contrast, view=view, body_part="SPINE", description=desc,
                             series_number=number)
    from pydicom.uid import generate_uid

    study = generate_uid(entropy_srcs=["sci-node-infer-check", case.subject, "study"])
    sample.write_series(spec, study, case.subject)
    return view


def make_models_dir(repo_models: Path, dest: Path, fold: FoldArtefact, log_file: Path) -> None:
    """Copy the registry's listed artefacts to ``dest``; add and activate ``fold`` via the CLI.

    Only ``registry.json`` and the version folders it lists are copied, so a training writing
    into ``repo_models`` at the same time cannot leave a half-written folder in the copy.

    Raises
    ------
    ModelError
        ``repo_models`` has no ``registry.json``, or ``sci-node models add`` failed.
    """
    reg_file = repo_models / "registry.json"
    if not reg_file.is_file():
        raise ModelError(f"model directory {str(repo_models)!r} has no registry.json")
    state = json.loads(reg_file.read_text(encoding="utf-8"))
    dest.mkdir(parents=True)
    for name, versions in state.get("stacks", {}).items():
        for version in versions:
            shutil.copytree(repo_models / name / version, dest / name / version)
    (dest / "registry.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    cmd = [str(VENV_BIN / "sci-node"), "models", "--models-dir", str(dest), "--log-format", "json",
           "add", str(fold.path), "--activate"]
    proc = _run(cmd, log_file)
    if proc.returncode != 0:
        raise ModelError(f"'sci-node models add {fold.path}' exited {proc.returncode}: "
                         f"{_tail(proc.stderr)} (log: {str(log_file)!r})")


def run_infer(series_root: Path, out: Path, models_dir: Path, log_file: Path) -> dict[str, Any]:
    """Run ``sci-node infer`` on ``series_root``; return its ``OUT/report.json``.

    Exit code 1 (a series failed) is not an error here: the failure is in the report.

    Raises
    ------
    SciNodeError
        The command exited otherwise, or wrote no ``report.json``.
    """
    cmd = [str(VENV_BIN / "sci-node"), "infer", str(series_root), "--out", str(out),
           "--models-dir", str(models_dir), "--device", "cpu", "--log-format", "json"]
    proc = _run(cmd, log_file)
    report = out / "report.json"
    if proc.returncode not in (0, 1) or not report.is_file():
        raise SciNodeError(f"'sci-node infer {series_root}' exited {proc.returncode}: {_tail(proc.stderr)} "
                           f"(log: {str(log_file)!r})")
    return json.loads(report.read_text(encoding="utf-8"))


def _run(cmd: list[str], log_file: Path) -> subprocess.CompletedProcess[str]:
    log.info("infer_check.run", cmd=" ".join(cmd))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600, check=False)
    with log_file.open("a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n[exit {proc.returncode}]\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n")
    return proc


def _tail(text: str, n: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-n:]) or "(no stderr)"


def cord_dice_from_seg(seg_path: Path, series_dir: Path, mask_path: Path) -> float:
    """Dice of SEG segment 1 (read back with highdicom) against the manual mask.

    The manual mask is resampled onto the series grid (``sci_node.pipeline.series.read_series``) with
    nearest neighbour and the identity transform; both masks are ``(Z, Y, X)`` there.
    """
    import highdicom as hd
    import SimpleITK as sitk

    from sci_node.pipeline.series import read_series

    vol = read_series(sorted(series_dir.glob("*.dcm")))
    seg = hd.seg.segread(seg_path)
    uids = [r.sop_instance_uid for r in vol.refs]
    back = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], skip_overlap_checks=True)[..., 0]
    manual = sitk.Resample(sitk.ReadImage(str(mask_path)), vol.image, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0)
    return dice(back, sitk.GetArrayFromImage(manual))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two same-shape masks (anything > 0 is foreground); 0 when both are empty."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if a.shape != b.shape:
        raise DataError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def fold_eval_dice(card: dict[str, Any], key: str) -> tuple[float | None, float | None]:
    """``(dice, threshold)`` of the fold's own evaluation of ``key`` at its inference threshold.

    The trainer scores held-out cases on a threshold grid (``metrics.per_threshold``); inference
    uses ``preprocessing.threshold``, so that entry is the comparable one. ``None`` when absent.
    """
    thr = card.get("preprocessing", {}).get("threshold")
    per = card.get("metrics", {}).get("per_threshold", {})
    if thr is None:
        return None, None
    from trainer.segment.evaluate import parse_setting

    vol = card.get("postprocessing", {}).get("min_volume_mm3")
    for t, cases in per.items():
        t_thr, t_vol = parse_setting(t)
        same_vol = t_vol is None or vol is None or abs(t_vol - float(vol)) < 1e-9
        if abs(t_thr - float(thr)) < 1e-9 and same_vol and key in cases:
            return cases[key].get("dice"), float(thr)
    return None, float(thr)


def _routing_text(rep: dict[str, Any]) -> str:
    rt = rep.get("routing") or {}
    labels = "/".join(str((rt.get(h) or {}).get("label") or "-") for h in ("anatomy", "view", "sequence"))
    return f"{labels} ({rt['rule']})" if rt.get("rule") else labels


def _fold_cases(fold: FoldArtefact, cases_by_key: dict[str, Any]) -> list[Any]:
    missing = [k for k in fold.val if k not in cases_by_key]
    if missing:
        raise DataError(f"fold {fold.version!r}: held-out case(s) {', '.join(missing)} not found in the data "
                        f"(found: {', '.join(sorted(cases_by_key))})")
    return [cases_by_key[k] for k in fold.val]


def check_fold(fold: FoldArtefact, cases_by_key: dict[str, Any], work: Path, sample: ModuleType) -> list[CaseResult]:
    """Series, registry, ``sci-node infer`` and SEG Dice for every held-out case of ``fold``.

    Layout under ``work/<held_out>/``: ``series/<case>/`` (DICOM), ``models/`` (registry copy),
    ``out/`` (the batch command's output), ``commands.log`` (every subprocess' output).
    """
    fdir = work / fold.held_out
    if fdir.exists():
        shutil.rmtree(fdir)
    fdir.mkdir(parents=True)
    results: dict[str, CaseResult] = {}
    uid_to_key: dict[str, str] = {}
    for number, case in enumerate(_fold_cases(fold, cases_by_key), start=1):
        sdir = fdir / "series" / case.key
        view = write_case_series(case, sdir, sample, number)
        uid_to_key[_series_uid(sdir)] = case.key
        thr_dice, thr = fold_eval_dice(fold.card, case.key)
        results[case.key] = CaseResult(fold.held_out, case.key, case.subject, case.contrast, fold.version, view,
                                       str(sdir), dice_fold_eval=thr_dice, fold_threshold=thr)
    models = fdir / "models"
    make_models_dir(REPO / "models", models, fold, fdir / "commands.log")
    report = run_infer(fdir / "series", fdir / "out", models, fdir / "commands.log")
    for rep in report.get("series", []):
        key = uid_to_key.get(str(rep.get("source")))
        if key is None:
            continue
        res = results[key]
        res.status, res.reason, res.routing = str(rep["status"]), rep.get("reason"), _routing_text(rep)
        active = (rep.get("model_versions") or {}).get("cord")
        if active != fold.version:
            raise ModelError(f"series {key!r} ran with cord {active!r}, not the fold model {fold.version!r}")
        if res.status == "done" and "seg.dcm" in rep.get("outputs", []):
            seg = fdir / "out" / str(rep["name"]) / "seg.dcm"
            res.seg = str(seg)
            res.dice_seg = cord_dice_from_seg(seg, Path(res.series_dir), cases_by_key[key].mask)
        log.info("infer_check.case", **asdict(res))
    return list(results.values())


def _series_uid(series_dir: Path) -> str:
    import pydicom

    first = next(iter(sorted(series_dir.glob("*.dcm"))))
    return str(pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)


def run_check(folds_dir: Path, data: Path, work: Path) -> list[CaseResult]:
    """Run :func:`check_fold` for every fold artefact under ``folds_dir``.

    Raises
    ------
    DataError, ModelError
        Bad fold folder or card, missing data or held-out case, failed registration.
    """
    from trainer.segment import data as tdata
    from trainer.segment.train import data_spec, load_config

    folds = load_folds(folds_dir)
    cases = tdata.discover(Path(data), data_spec(load_config("cord", None)))
    by_key = {c.key: c for c in cases}
    sample = load_sample_module()
    work.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    for fold in folds:
        results += check_fold(fold, by_key, work, sample)
    return results


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def format_table(results: Sequence[CaseResult]) -> str:
    """One markdown row per held-out case."""
    rows = ["| held-out subject | case | contrast | view | fold model | status | routing (anatomy/view/sequence, rule) "
            "| cord Dice from SEG | fold's own eval Dice (thr) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        status = r.status if not r.reason else f"{r.status}: {r.reason}"
        own = _fmt(r.dice_fold_eval) + ("" if r.fold_threshold is None else f" ({r.fold_threshold:g})")
        rows.append(f"| {r.held_out} | {r.case} | {r.contrast} | {r.view} | {r.fold_version} | {status} | "
                    f"{r.routing} | {_fmt(r.dice_seg)} | {own} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the check, print the table, optionally write JSON; exit 0, or the error's code."""
    from sci_node.logs import configure_logging

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=Path, required=True, help="--keep-folds directory (one folder per fold)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "spine")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one, kept)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    configure_logging("auto", args.log_level)
    work = args.work or Path(tempfile.mkdtemp(prefix="infer_check_"))
    try:
        results = run_check(args.folds, args.data, work.resolve())
    except SciNodeError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    print(format_table(results))
    print(f"\nwork folder (series, registries, outputs, command logs): {work}")
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
