"""A bare Orthanc for tests that need a PACS (query/retrieve): its own config, database and ports on loopback."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from sci_node.config import Destination


@dataclass
class BareOrthanc:
    """Orthanc 1.10 with only its DICOM server: ``query_aes`` may C-FIND and C-GET from 127.0.0.1."""

    folder: Path
    dicom_port: int
    http_port: int
    query_aes: tuple[str, ...] = ("SCINODE",)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def peer(self) -> Destination:
        return Destination("ORTHANC", "127.0.0.1", self.dicom_port)

    def start(self, timeout: float = 60) -> "BareOrthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        mods = {f"q{i}": {"AET": aet, "Host": "127.0.0.1", "Port": 1, "AllowFind": True, "AllowGet": True,
                          "AllowMove": False, "AllowStore": False} for i, aet in enumerate(self.query_aes)}
        db = str(self.folder / "db")
        cfg = {"Name": "test-pacs", "StorageDirectory": db, "IndexDirectory": db,
               "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
               "DicomModalities": mods, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": False}
        (self.folder / "orthanc.json").write_text(json.dumps(cfg))
        with (self.folder / "orthanc.log").open("ab") as log:
            self.proc = subprocess.Popen([shutil.which("Orthanc") or "Orthanc", str(self.folder / "orthanc.json")],
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{self.http_port}/system"
                if httpx.get(url, trust_env=False, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"Orthanc did not start: {(self.folder / 'orthanc.log').read_text()[-2000:]}")

    def store(self, files: list[Path]) -> None:
        """dcmtk's storescu sends ``files`` as a scanner would."""
        subprocess.run(["storescu", "-aet", "SCANNER", "-aec", "ORTHANC", "127.0.0.1", str(self.dicom_port),
                        *map(str, files)], check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None
