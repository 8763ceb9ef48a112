"""The Conformance Statement, checked against the running node with dcmtk as the peer.

The machine-read tables of ``conformance/conformance-statement.md`` list the SOP classes and
transfer syntaxes the SCP accepts. One association from dcmtk ``storescu`` proposes every
listed pair *and* pairs that are not listed (other storage classes, retired or video
transfer syntaxes); the A-ASSOCIATE-AC that dcmtk prints must accept exactly the listed ones.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from pydicom.data import get_testdata_file

from sci_node.config import REPO_ROOT

from conftest import NodeProc, storescu

STATEMENT = REPO_ROOT / "conformance" / "conformance-statement.md"
VERIFICATION = "1.2.840.10008.1.1"
#: Not claimed by the statement: must be refused.
OTHER_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage (we send these, never receive them)
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR Storage
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy Storage
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
)
OTHER_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 multi-component lossless
    "1.2.840.10008.1.2.4.100",  # MPEG2 MP@ML
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
)


def statement_table(name: str) -> list[str]:
    """The UIDs (last column) of the machine-read table ``<!-- conformance:NAME -->``."""
    text = STATEMENT.read_text(encoding="utf-8")
    m = re.search(rf"<!-- conformance:{re.escape(name)} -->\n(.*?)<!-- /conformance -->", text, re.S)
    assert m, f"table {name} missing from {STATEMENT}"
    uids = [row.strip().strip("|").split("|")[-1].strip() for row in m.group(1).splitlines()[2:] if row.strip()]
    assert uids and all(re.fullmatch(r"[0-9.]+", u) for u in uids), uids
    return uids


def probe_config(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """A dcmtk storescu config (``-xf FILE probe``) proposing one context per (SOP class, TS)."""
    tss = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(tss):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Probe]"]
    for n, (sop, ts) in enumerate(pairs, start=1):
        lines.append(f"PresentationContext{n} = {sop}\\TS{tss.index(ts)}")
    lines += ["[[Profiles]]", "[probe]", "PresentationContexts = Probe"]
    path.write_text("\n".join(lines) + "\n")
    return path


def accepted_contexts(dcmtk_debug: str) -> dict[int, bool]:
    """Context ID -> accepted?, from the A-ASSOCIATE-AC dump of ``storescu -d``."""
    ac = dcmtk_debug.split("BEGIN A-ASSOCIATE-AC", 1)[1].split("END A-ASSOCIATE-AC", 1)[0]
    return {int(cid): result == "Accepted" for cid, result in re.findall(r"Context ID:\s+(\d+) \(([^)]+)\)", ac)}


def test_statement_matches_negotiation(node_factory: Callable[..., NodeProc], tmp_path: Path) -> None:
    sop_classes = statement_table("scp-sop-classes")
    storage_ts = statement_table("scp-transfer-syntaxes")
    verification_ts = statement_table("verification-transfer-syntaxes")
    assert VERIFICATION in sop_classes
    storage = [s for s in sop_classes if s != VERIFICATION]

    pairs: list[tuple[str, str]] = []
    expected: list[bool] = []
    for sop in storage:
        for ts in (*storage_ts, *OTHER_TRANSFER_SYNTAXES):
            pairs.append((sop, ts))
            expected.append(ts in storage_ts)
    for sop in OTHER_SOP_CLASSES:
        pairs.append((sop, "1.2.840.10008.1.2.1"))
        expected.append(False)
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
               "1.2.840.10008.1.2.4.50"):
        pairs.append((VERIFICATION, ts))
        expected.append(ts in verification_ts)
    assert len(pairs) <= 128  # one association holds at most 128 presentation contexts

    node = node_factory('allowed_aes = ["SCANNER"]\n').start()
    cfg = probe_config(tmp_path / "probe.cfg", pairs)
    mr = Path(get_testdata_file("MR_small.dcm"))  # Explicit VR Little Endian: sent on a listed context
    res = storescu(node.port, [mr], extra=["-xf", str(cfg), "probe"], debug=True)
    assert res.returncode == 0, res.stdout + res.stderr
    got = accepted_contexts(res.stdout + res.stderr)
    assert len(got) == len(pairs)
    mismatches = [(pairs[i], exp, got[2 * i + 1]) for i, exp in enumerate(expected) if got[2 * i + 1] != exp]
    assert not mismatches, f"(SOP class, TS), statement says accepted, node accepted: {mismatches}"
