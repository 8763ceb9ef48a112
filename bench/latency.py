"""End-to-end latency: last C-STORE acknowledged -> DICOM-SEG received at the destination.

Two paths, each on a warm node (one warm-up series first, which includes model loading):

* ``direct``: ``storescu`` -> ``sci-node serve --stable-seconds S`` -> DICOM-SEG C-STOREd to a
  dcmtk ``storescp`` destination. Reported: the time from ``storescu`` returning to the SEG
  file appearing in the destination folder, and that minus ``S`` (processing + export).
* ``orthanc``: ``storescu`` -> Orthanc -> (``STABLE_SERIES`` after StableAge) -> node ->
  SEG back into Orthanc (``sci-node stack``, :class:`sci_node.app.stack.Stack`); the time until
  ``/tools/find`` shows the SEG series in the study, and that minus both stable waits
  (Orthanc's StableAge + the node's own stable wait).

Inputs: the committed sagittal lumbar series (``tests/data/series/lumbar_sag_T2w``, 38 slices) and, with
``--slices 50``, the same series resampled to 50 slices (same field of view) - the target is "<= 6 s beyond the stable
wait for a 50-slice sagittal T2w". Each round sends a fresh copy (new UIDs).

Usage (from the repo root)::

    .venv/bin/python bench/latency.py [--rounds 3] [--stable-seconds 1] [--slices 0 50]
        [--skip-orthanc] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import SAMPLE, emit, free_port, replicate, resample_series, start_node, start_storescp, stop, storescu


def _seg_arrived(out: Path) -> bool:
    """storescp names files after the SOP class: ``SG.<uid>`` for Segmentation Storage."""
    return any(p.name.startswith("SG.") for p in out.iterdir())


def bench_direct(tmp: Path, inputs: dict[str, Path], rounds: int, stable: float, json_out: Path | None) -> None:
    """Warm node with a storescp destination; ``rounds`` fresh copies of each input."""
    dest, dport = start_storescp(tmp / "dest")
    node, nport = start_node(tmp / "node", stable=stable, dest_port=dport, log_level="INFO")
    try:
        plan = [("warm-up", next(iter(inputs)))] + [(r, name) for r in range(rounds) for name in inputs]
        for k, (r, name) in enumerate(plan):
            for f in (tmp / "dest").iterdir():
                f.unlink()
            files = replicate(inputs[name], 1, tmp / f"send{k}")
            storescu(nport, files, "SCINODE")
            t_ack = time.perf_counter()
            deadline = t_ack + 900
            while not _seg_arrived(tmp / "dest"):
                if time.perf_counter() > deadline or node.poll() is not None:
                    raise RuntimeError(f"no SEG at the destination; see {tmp / 'node.log'}")
                time.sleep(0.02)
            dt = time.perf_counter() - t_ack
            emit({"bench": "latency", "path": "direct", "series": name, "slices": len(files), "round": r,
                  "stable_s": stable, "seconds": round(dt, 3), "beyond_stable_s": round(dt - stable, 3)},
                 json_out)
            shutil.rmtree(tmp / f"send{k}", ignore_errors=True)
    finally:
        stop(node)
        stop(dest)


def _find_seg(url: str, study: str) -> bool:
    import httpx

    q = {"Level": "Series", "Query": {"StudyInstanceUID": study, "Modality": "SEG"}}
    try:
        r = httpx.post(f"{url}/tools/find", json=q, auth=("bench", "bench-pw"), timeout=10, trust_env=False)
        return r.status_code == 200 and bool(r.json())
    except httpx.TransportError:
        return False


def bench_orthanc(tmp: Path, inputs: dict[str, Path], rounds: int, stable: float, json_out: Path | None) -> None:
    """``sci-node stack`` (Orthanc + node); SEG visible in Orthanc."""
    import pydicom

    from sci_node.app.stack import NODE_STABLE_SECONDS, OrthancCredentials, Stack, StackPorts, StackSpec
    from sci_node.config import load_config

    cfg = load_config(None, {"data_dir": str(tmp / "stack"), "stable_seconds": stable})
    ports = StackPorts(free_port(), free_port(), free_port())
    waits = max(1, int(-(-stable // 1))) + min(stable, NODE_STABLE_SECONDS)  # StableAge + node stable
    with Stack(StackSpec(cfg, ports, OrthancCredentials("bench", "bench-pw"))) as stack:
        stack.wait_ready()
        plan = [("warm-up", next(iter(inputs)))] + [(r, name) for r in range(rounds) for name in inputs]
        for k, (r, name) in enumerate(plan):
            files = replicate(inputs[name], 1, tmp / f"osend{k}")
            study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            storescu(ports.dicom, files, "ORTHANC")
            t_ack = time.perf_counter()
            deadline = t_ack + 900
            while not _find_seg(stack.url, study):
                stack.check_alive()
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"no SEG in Orthanc after 900 s; logs in {stack.log_dir}")
                time.sleep(0.1)
            dt = time.perf_counter() - t_ack
            emit({"bench": "latency", "path": "orthanc", "series": name, "slices": len(files), "round": r,
                  "stable_s": waits, "seconds": round(dt, 3), "beyond_stable_s": round(dt - waits, 3)}, json_out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, default=SAMPLE)
    ap.add_argument("--slices", type=int, nargs="+", default=[0, 50],
                    help="0 = the series as is; N = resampled to N slices")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stable-seconds", type=float, default=1.0)
    ap.add_argument("--skip-direct", action="store_true")
    ap.add_argument("--skip-orthanc", action="store_true")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scinode-latency-"))
    try:
        inputs = {}
        for n in args.slices:
            if n:
                resample_series(args.series, tmp / f"in-{n}", n_slices=n)
                inputs[f"sagittal-{n}"] = tmp / f"in-{n}"
            else:
                inputs[f"sagittal-{len(list(args.series.glob('*.dcm')))}"] = args.series
        if not args.skip_direct:
            bench_direct(tmp / "direct", inputs, args.rounds, args.stable_seconds, args.json_out)
        if not args.skip_orthanc:
            bench_orthanc(tmp / "orthanc", inputs, args.rounds, args.stable_seconds, args.json_out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
