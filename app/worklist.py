"""A per-user worklist: several studies (from the PACS or uploads) with each one's status, so a clinician works
through a day's cases: queued -> running -> done -> reviewed -> sent (the SEG stored on the PACS).

The list is kept on the server, one JSON file per user named by a hash of the user name (no names in file names),
holding what identifies a case on its PACS (endpoint name, Study/Series Instance UIDs), the label shown (date,
modality, descriptions: never patient names) and its status. A PACS case's images are retrieved again when it is
opened (nothing of them is stored here); an upload case's bytes live in this session only, as every upload does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from medseg.io.writers import atomic_path

log = logging.getLogger("medseg.app")


class CaseStatus(StrEnum):
    queued = "queued"  # in the list, not segmented yet
    running = "running"  # being segmented now
    done = "done"  # segmented, not reviewed
    reviewed = "reviewed"  # accepted or corrected (or rejected) in the review panel
    sent = "sent"  # its SEG was stored on the PACS it came from


@dataclass
class Case:
    case_id: str
    source: str  # "pacs" | "upload"
    label: str
    status: CaseStatus = CaseStatus.queued
    added: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    endpoint: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    upload_sha256: str | None = None
    verdict: str | None = None  # the review's verdict, once reviewed
    seg_sop_uid: str | None = None  # the stored SEG, once sent

    @property
    def from_pacs(self) -> bool:
        return self.source == "pacs"


def worklist_file(folder: Path, user: str | None) -> Path:
    """``<folder>/<sha256(user)[:24]>.json``: the user's list, its name saying nothing about who."""
    return Path(folder) / f"{hashlib.sha256((user or 'anonymous').encode()).hexdigest()[:24]}.json"


class Worklist:
    """One user's cases, in the order added; every change is saved at once (atomically, file mode 0600)."""

    def __init__(self, path: Path, cases: list[Case] | None = None):
        self.path = path
        self.cases = cases or []

    @classmethod
    def load(cls, folder: Path, user: str | None) -> Worklist:
        path = worklist_file(folder, user)
        try:
            raw = json.loads(path.read_text())
            cases = [Case(**{**c, "status": CaseStatus(c["status"])}) for c in raw.get("cases", [])]
        except FileNotFoundError:
            cases = []
        except (ValueError, TypeError, KeyError) as e:  # a damaged file: start afresh, keep the old one aside
            log.warning("worklist %s unreadable (%s); starting an empty one", path.name, type(e).__name__)
            path.replace(path.with_suffix(".damaged"))
            cases = []
        return cls(path, cases)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"cases": [asdict(c) for c in self.cases]}, indent=1))
            os.chmod(tmp, 0o600)

    def get(self, case_id: str | None) -> Case | None:
        return next((c for c in self.cases if c.case_id == case_id), None)

    def add_pacs(self, endpoint: str, study_uid: str, series_uid: str, label: str) -> Case:
        """Queue a PACS series (once: adding it again returns the case already listed)."""
        for c in self.cases:
            if c.from_pacs and (c.endpoint, c.series_uid) == (endpoint, series_uid):
                return c
        case = Case(uuid.uuid4().hex, "pacs", label, endpoint=endpoint, study_uid=study_uid, series_uid=series_uid)
        self.cases.append(case)
        self.save()
        return case

    def add_upload(self, sha256: str, label: str) -> Case:
        """Queue an upload (by its content hash; once)."""
        for c in self.cases:
            if c.source == "upload" and c.upload_sha256 == sha256:
                return c
        case = Case(uuid.uuid4().hex, "upload", label, upload_sha256=sha256)
        self.cases.append(case)
        self.save()
        return case

    def update(self, case: Case, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(case, key, value)
        self.save()

    def remove(self, case_id: str) -> None:
        self.cases = [c for c in self.cases if c.case_id != case_id]
        self.save()

    def counts(self) -> dict[str, int]:
        out = {str(s): 0 for s in CaseStatus}
        for c in self.cases:
            out[str(c.status)] += 1
        return out


def status_after_result(case: Case, reviewed_verdict: str | None) -> CaseStatus:
    """A segmented case's status: sent stays sent; a saved review makes it reviewed; else done."""
    if case.status == CaseStatus.sent:
        return CaseStatus.sent
    if reviewed_verdict is not None:
        return CaseStatus.reviewed
    return CaseStatus.done
