"""Time the embedded stack end to end: scanner -> Orthanc -> node -> SEG back in Orthanc.

Starts ``sci-node stack`` pieces in-process (:class:`sci_node.app.stack.Stack`) on free loopback
ports in a temporary data dir, sends the committed 38-slice lumbar series
(``tests/data/series/lumbar_sag_T2w``, the demo sample until issue #15) with dcmtk ``storescu``
(with and without ``TCP_NODELAY=1``) and reports, as JSON:

* ``storescu_s`` / ``storescu_nagle_s``: the C-STORE of the series into Orthanc,
* ``seg_after_send_s``: from the end of the send to the SEG series existing in the study
  (Orthanc's StableAge + forward + node stable wait + pipeline + C-STORE back),
* ``sr_after_send_s``: the same for the SR.

Usage: ``.venv/bin/python bench/stack_latency.py [--stable-seconds 1] [--processor pipeline] [--models-dir DIR]``
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sci_node.app.stack import OrthancCredentials, Stack, StackPorts, StackSpec, sample_series_files, wait_for_modality  # noqa: E402
from sci_node.config import load_config  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _storescu(files: list[Path], port: int, nodelay: bool) -> float:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aet", "SCANNER", "-aec", "ORTHANC", "127.0.0.1", str(port), *map(str, files)],
                   check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stable-seconds", type=float, default=1.0)
    ap.add_argument("--processor", default="pipeline", choices=["pipeline", "derived-sc"])
    ap.add_argument("--models-dir", type=Path, default=REPO / "models", help="model registry (default: the repo's)")
    args = ap.parse_args()
    files = sample_series_files(REPO / "tests" / "data" / "series" / "lumbar_sag_T2w")
    import pydicom

    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with tempfile.TemporaryDirectory() as tmp:
        toml = Path(tmp) / "node.toml"
        toml.write_text(f'processor = "{args.processor}"\nmodels_dir = "{args.models_dir}"\n')
        cfg = load_config(toml, {"data_dir": str(Path(tmp) / "D"), "stable_seconds": args.stable_seconds})
        ports = StackPorts(_free_port(), _free_port(), _free_port())
        spec = StackSpec(cfg, ports, OrthancCredentials("bench", "bench-pw"), config_file=toml)
        with Stack(spec) as stack:
            t_start = time.perf_counter()
            stack.wait_ready()
            ready_s = time.perf_counter() - t_start
            client = stack.client()
            nodelay = _storescu(files, ports.dicom, nodelay=True)
            t_sent = time.perf_counter()
            modality = "SEG" if args.processor == "pipeline" else "OT"
            wait_for_modality(client, study, modality, 900, alive=stack.check_alive)
            seg_s = time.perf_counter() - t_sent
            sr_s = None
            if args.processor == "pipeline":
                wait_for_modality(client, study, "SR", 120, alive=stack.check_alive)
                sr_s = time.perf_counter() - t_sent
            # the same instances again without TCP_NODELAY (Orthanc keeps the first copies: no new job)
            nagle = _storescu(files, ports.dicom, nodelay=False)
    print(json.dumps({"instances": len(files), "stable_seconds": args.stable_seconds, "processor": args.processor,
                      "stack_ready_s": round(ready_s, 2), "storescu_nagle_s": round(nagle, 3),
                      "storescu_s": round(nodelay, 3), "seg_after_send_s": round(seg_s, 2),
                      "sr_after_send_s": None if sr_s is None else round(sr_s, 2)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
