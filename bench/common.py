"""Helpers shared by the benchmark scripts: ports, peers (sci-node, dcmtk, Orthanc), inputs, machine.

Benchmarks print numbers, they never pass or fail. Every server binds 127.0.0.1 on a free
port and is stopped by the script that started it. dcmtk programs (``storescu``,
``storescp``, and Orthanc, which embeds dcmtk) run with ``TCP_NODELAY=1`` in their
environment: without it every dcmtk transfer stalls ~40-90 ms per instance on Nagle /
delayed ACK.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
#: the sagittal series the published numbers were measured on: lumbar T2w, 38 slices of 201 x 112 px, 1 mm
#: (the demo sample until issue #15; the demo now sends ``sample/series``, a 16-slice cervical crop)
SAMPLE = REPO / "tests" / "data" / "series" / "lumbar_sag_T2w"
AXIAL = REPO / "tests" / "data" / "series" / "unf01_axial_T2w"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
VENV_BIN = Path(sys.executable).parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# -- machine ------------------------------------------------------------------------------

def loadavg() -> str:
    """The 1/5/15-minute load averages as a string (record it next to every number)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python, torch (if importable) and the current load."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": mem_gib, "os": platform.platform(),
            "python": platform.python_version(), "load": loadavg()}


def emit(record: dict[str, Any], json_out: Path | None) -> None:
    """Print a result record (one JSON line) and append it to ``json_out`` when given."""
    record = {"load": loadavg(), **record}
    line = json.dumps(record)
    print(line, flush=True)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        with open(json_out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


# -- processes ----------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something listens on ``port`` (raise if ``proc`` exits or on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening after {timeout}s")


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """SIGTERM ``proc`` and wait; SIGKILL it after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def storescu(port: int, files: Sequence[Path], called: str, calling: str = "SCANNER") -> float:
    """Send ``files`` with dcmtk ``storescu`` (one association); return the wall time (s)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(port),
                           *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True, timeout=900)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"storescu to {called} on {port} failed: {proc.stderr[-800:]}")
    return dt


def start_storescp(out: Path, port: int | None = None, aet: str = "DEST") -> tuple[subprocess.Popen[bytes], int]:
    """dcmtk ``storescp`` writing into ``out`` (``+uf`` unique names)."""
    out.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = subprocess.Popen(["storescp", "-aet", aet, "-od", str(out), "+xa", "+uf", str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc=proc)
    return proc, port


def sci_node_cmd() -> list[str]:
    """How to run the ``sci-node`` console script of this venv."""
    exe = VENV_BIN / "sci-node"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "sci_node.cli"]


def start_node(data_dir: Path, *, stable: float, processor: str = "pipeline", dest_port: int | None = None,
               extra_toml: str = "", log_level: str = "WARNING",
               code: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """``sci-node serve`` on a free port with its own data dir (calling AE ``SCANNER`` allowed).

    ``code``: another checkout of the package to run instead of this tree's (``git archive REV sci_node
    models pyproject.toml | tar -x -C DIR``), as ``python -m sci_node.cli`` with ``PYTHONPATH=DIR``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = data_dir.parent / f"{data_dir.name}.toml"
    cfg.write_text(f'processor = "{processor}"\n{extra_toml}')
    base = sci_node_cmd() if code is None else [sys.executable, "-m", "sci_node.cli"]
    env = None if code is None else {**os.environ, "PYTHONPATH": str(code)}
    cmd = [*base, "serve", "--config", str(cfg), "--port", str(port), "--data-dir", str(data_dir),
           "--stable-seconds", str(stable), "--allow-ae", "SCANNER", "--log-format", "json",
           "--log-level", log_level]
    if dest_port:
        cmd += ["--destination", f"DEST@127.0.0.1:{dest_port}"]
    with open(data_dir.parent / f"{data_dir.name}.log", "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=code)
    wait_port(port, proc=proc)
    return proc, port


def orthanc_exe() -> str:
    """Orthanc's executable (Debian puts it in /usr/sbin)."""
    exe = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if exe is None:
        raise RuntimeError("Orthanc is not installed: run bash scripts/install.sh")
    return exe


def start_orthanc(work: Path, aet: str = "ORTHANC") -> tuple[subprocess.Popen[bytes], int, int]:
    """A bare Orthanc (no plugins, default storage settings) on free loopback ports.

    Returns the process, its DICOM port and its HTTP port.
    """
    work.mkdir(parents=True, exist_ok=True)
    dicom, http = free_port(), free_port()
    conf = {"Name": "bench", "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
            "DicomAet": aet, "DicomPort": dicom, "HttpPort": http, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpServerEnabled": True, "Plugins": [],
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "StorageCompression": False,
            "DicomModalities": {}, "OrthancPeers": {}}
    path = work / "orthanc.json"
    path.write_text(json.dumps(conf, indent=1))
    with open(work / "orthanc.log", "ab") as fh:
        proc = subprocess.Popen([orthanc_exe(), str(path)], env=DCMTK_ENV, stdout=fh, stderr=subprocess.STDOUT)
    wait_port(dicom, proc=proc)
    return proc, dicom, http


# -- inputs -------------------------------------------------------------------------------

def dicom_files(folder: Path) -> list[Path]:
    """The ``*.dcm`` files of a series folder, sorted."""
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise RuntimeError(f"no *.dcm files in {folder}")
    return files


def replicate(series: Path, copies: int, out: Path) -> list[Path]:
    """``copies`` copies of a series, each a distinct study/series (new UIDs), written into ``out``."""
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True, exist_ok=True)
    made = []
    datasets = [pydicom.dcmread(f) for f in dicom_files(series)]
    for c in range(copies):
        study, ser = generate_uid(), generate_uid()
        for i, ds in enumerate(datasets):
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, ser, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = out / f"c{c:03d}_{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            made.append(path)
    return made


def resample_series(series: Path, out: Path, n_slices: int | None = None,
                    inplane: int | None = None) -> list[Path]:
    """Resample a single-frame MR series onto ``n_slices`` slices of ``inplane`` x ``inplane`` pixels.

    The field of view is kept (same physical extent, thinner slices / smaller pixels), as a
    scanner would acquire the same anatomy at a finer matrix; intensities are linearly
    interpolated (``scipy.ndimage.zoom``, order 1) and written back as uint16. Headers are
    copied from the source with the geometry tags (Rows, Columns, PixelSpacing,
    SliceThickness, SpacingBetweenSlices, ImagePositionPatient, SliceLocation) and all UIDs
    updated. ``None`` keeps the source's slice count / matrix.
    """
    import copy

    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid
    from scipy import ndimage

    datasets = [pydicom.dcmread(f) for f in dicom_files(series)]
    iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    vol = np.stack([d.pixel_array.astype(np.float32) for d in datasets])  # (slice, row, col)
    n0, r0, c0 = vol.shape
    n1, r1, c1 = n_slices or n0, inplane or r0, inplane or c0
    vol = ndimage.zoom(vol, (n1 / n0, r1 / r0, c1 / c0), order=1, grid_mode=True, mode="nearest")
    vol = np.clip(np.rint(vol), 0, 65535).astype(np.uint16)
    first = datasets[0]
    ipp0 = np.asarray([float(v) for v in first.ImagePositionPatient])
    step0 = float(np.dot(normal, [float(v) for v in datasets[-1].ImagePositionPatient]) -
                  np.dot(normal, ipp0)) / max(n0 - 1, 1)
    rs0, cs0 = (float(v) for v in first.PixelSpacing)
    step1, rs1, cs1 = step0 * n0 / n1, rs0 * r0 / r1, cs0 * c0 / c1
    # grid_mode zoom keeps the outer voxel edges: shift the first centre by half the spacing change
    corner = ipp0 - normal * step0 / 2 - iop[3:] * rs0 / 2 - iop[:3] * cs0 / 2
    origin = corner + normal * step1 / 2 + iop[3:] * rs1 / 2 + iop[:3] * cs1 / 2
    study, ser = generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n1):
        ds = copy.deepcopy(first)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, ser, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Rows, ds.Columns = r1, c1
        ds.PixelSpacing = [round(rs1, 6), round(cs1, 6)]
        ds.SliceThickness = round(abs(step1), 6)
        if "SpacingBetweenSlices" in ds:
            ds.SpacingBetweenSlices = round(abs(step1), 6)
        pos = origin + normal * step1 * k
        ds.ImagePositionPatient = [round(float(v), 6) for v in pos]
        if "SliceLocation" in ds:
            ds.SliceLocation = round(float(np.dot(normal, pos)), 6)
        ds.InstanceNumber = k + 1
        for tag in ("LargestImagePixelValue", "SmallestImagePixelValue"):
            if tag in ds:
                del ds[tag]
        ds.PixelData = vol[k].tobytes()
        path = out / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def add_variant_arg(ap: Any) -> None:
    """``--variant NAME=TOML`` on an ``argparse`` parser (read back with :func:`parse_variants`)."""
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=TOML",
                    help="a node configuration, its config lines (\\n is a line break); 'default' is always run")


def parse_variants(texts: Sequence[str]) -> dict[str, str]:
    """``--variant NAME=TOML`` arguments as ``{name: config lines}`` (``\\n`` in TOML is a line break)."""
    return {k: v.replace("\\n", "\n") for k, v in (t.split("=", 1) for t in texts)}


def parse_rules(texts: Sequence[str]) -> Any:
    """``FollowupRules`` with ``--rule KEY=VALUE`` overrides (``diff_min_mm3=5``)."""
    import dataclasses

    from sci_node.imaging.followup import FollowupRules

    kinds = {f.name: type(f.default) for f in dataclasses.fields(FollowupRules)}
    over: dict[str, Any] = {}
    for t in texts:
        k, _, v = t.partition("=")
        over[k] = (v.lower() in ("1", "true", "yes")) if kinds[k] is bool else kinds[k](v)
    return FollowupRules(**over)

