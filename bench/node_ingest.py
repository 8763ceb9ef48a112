"""Bench the node's DICOM plumbing on loopback (not a test: prints numbers).

1. Ingest rate: the same files sent by dcmtk ``storescu`` to dcmtk ``storescp`` and to
   ``sci-node serve`` (processing held back with a long ``stable_seconds``), alternating,
   ``--rounds`` times each, in one run. Reports instances/s and MB/s (median).
2. Latency: ``sci-node serve --stable-seconds S`` with a storescp destination; time from
   ``storescu`` returning (last C-STORE acknowledged) to the first result file at the
   destination, and that minus S (processing + export).

Usage (from the repo root)::

    .venv/bin/python bench/node_ingest.py [--series sample/series] [--copies 8] [--rounds 3]
        [--processor pipeline|derived-sc] [--stable-seconds 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

ENV = {**os.environ, "TCP_NODELAY": "1"}
SCI_NODE = str(Path(sys.executable).parent / "sci-node")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening after {timeout}s")


def replicate(series: Path, copies: int, out: Path) -> list[Path]:
    """``copies`` copies of a series, each a distinct series (new study/series/SOP UIDs)."""
    files = sorted(series.glob("*.dcm"))
    made = []
    for c in range(copies):
        study, ser = generate_uid(), generate_uid()
        for f in files:
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, ser, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            p = out / f"c{c:02d}_{f.name}"
            ds.save_as(p, enforce_file_format=True)
            made.append(p)
    return made


def send(port: int, files: list[Path], called: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aet", "SCANNER", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                   check=True, env=ENV, timeout=600)
    return time.perf_counter() - t0


def start_node(tmp: Path, name: str, stable: float, dest_port: int | None, processor: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f'processor = "{processor}"\n')
    cmd = [SCI_NODE, "serve", "--config", str(cfg), "--port", str(port), "--data-dir", str(tmp / name),
           "--stable-seconds", str(stable), "--allow-ae", "SCANNER", "--log-format", "json", "--log-level", "WARNING"]
    if dest_port:
        cmd += ["--destination", f"DEST@127.0.0.1:{dest_port}"]
    proc = subprocess.Popen(cmd, stdout=open(tmp / f"{name}.log", "wb"), stderr=subprocess.STDOUT)
    wait_port(port)
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench_ingest(tmp: Path, files: list[Path], rounds: int) -> None:
    mb = sum(f.stat().st_size for f in files) / 1e6
    dcmtk_t, node_t = [], []
    for r in range(rounds):
        out = tmp / f"scp-out-{r}"
        out.mkdir()
        port = free_port()
        scp = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(out), "+xa", str(port)], env=ENV)
        wait_port(port)
        dcmtk_t.append(send(port, files, "DEST"))
        stop(scp)
        node, nport = start_node(tmp, f"ingest-{r}", stable=3600, dest_port=None, processor="derived-sc")
        node_t.append(send(nport, files, "SCINODE"))
        stop(node)
    for name, ts in (("dcmtk storescp", dcmtk_t), ("sci-node SCP", node_t)):
        med = statistics.median(ts)
        print(f"ingest  {name:<15} {len(files)} files {mb:.1f} MB: median {med:.2f} s = "
              f"{len(files) / med:.0f} inst/s, {mb / med:.1f} MB/s  (rounds: {', '.join(f'{t:.2f}' for t in ts)})")


def _has_seg(out: Path) -> bool:
    for f in out.iterdir():
        try:
            if pydicom.dcmread(f, stop_before_pixels=True).Modality in ("SEG", "OT"):
                return True
        except Exception:
            continue  # still being written
    return False


def bench_latency(tmp: Path, series: Path, stable: float, processor: str, rounds: int) -> None:
    """One warm node; a warm-up series first (model loading), then ``rounds`` fresh copies."""
    out = tmp / "dest"
    out.mkdir()
    dport = free_port()
    scp = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(out), "+xa", str(dport)], env=ENV)
    wait_port(dport)
    node, nport = start_node(tmp, "lat", stable=stable, dest_port=dport, processor=processor)
    lat = []
    try:
        for r in range(rounds + 1):
            for f in out.iterdir():
                f.unlink()
            files = replicate(series, 1, Path(tempfile.mkdtemp(dir=tmp)))
            send(nport, files, "SCINODE")
            t_ack = time.perf_counter()
            deadline = t_ack + 900
            while not _has_seg(out) and time.perf_counter() < deadline:
                time.sleep(0.02)
            dt = time.perf_counter() - t_ack
            label = "warm-up (includes model loading)" if r == 0 else f"round {r}"
            print(f"latency {label}: {dt:.2f} s (stable wait {stable} s; processing+export {dt - stable:.2f} s)")
            if r:
                lat.append(dt)
    finally:
        stop(node)
        stop(scp)
    print(f"latency median: last C-STORE -> result at destination {statistics.median(lat):.2f} s "
          f"(processor {processor}, stable_seconds {stable}, {rounds} rounds on a warm node)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, default=Path("sample/series"))
    ap.add_argument("--copies", type=int, default=8, help="copies of the series for the ingest bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processor", default="pipeline", choices=["pipeline", "derived-sc"])
    ap.add_argument("--stable-seconds", type=float, default=2.0)
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scinode-bench-"))
    try:
        if not args.skip_ingest:
            (tmp / "files").mkdir()
            bench_ingest(tmp, replicate(args.series, args.copies, tmp / "files"), args.rounds)
        if not args.skip_latency:
            bench_latency(tmp, args.series, args.stable_seconds, args.processor, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
