"""STOW-RS a task's files to a DICOMweb destination (PS3.18 10.5), with httpx.

The task's DICOM files go as Part 10 files in ``multipart/related;
type="application/dicom"`` requests to ``<url>/studies``, at most
``batch_files`` files / ``batch_bytes`` bytes per request, each body streamed
from the files (Content-Length known up front: no chunked encoding needed by
the server). Outcomes follow the C-STORE rules (SPEC §3):

* unreachable, timeout, connection lost, 5xx, 429 → the task stops there
  (``association_error``; retryLater);
* other 4xx (bad token, unknown path, too large, refused media type) → the
  task stops there, permanently;
* 200/202/409 → per instance from the answer's ReferencedSOPSequence and
  FailedSOPSequence; a failure reason 0xA7xx (out of resources) is transient.
"""
from __future__ import annotations

import json
import secrets as _random
from pathlib import Path
from typing import IO, Any, Iterator

import httpx

from clara_adapter.export.scu import DicomFile, FileFailure, NotDicom, SendReport, read_header
from clara_dicom.models import ClaraDestinationSpec

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
READ_CHUNK = 1 << 20


class StowSender:
    """Sends files to DICOMweb destinations; one instance shared by the agent's workers."""

    def __init__(self, *, connection_timeout: float = 10, network_timeout: float = 60, response_timeout: float = 120,
                 batch_files: int = 100, batch_bytes: int = 64 << 20, user_agent: str = "clara-dicom"):
        self.batch_files = batch_files
        self.batch_bytes = batch_bytes
        self._client = httpx.Client(
            timeout=httpx.Timeout(connect=connection_timeout, write=network_timeout, read=response_timeout,
                                  pool=network_timeout),
            headers={"User-Agent": user_agent}, follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def send(self, dest: ClaraDestinationSpec, files: list[tuple[str, Path]], token: str | None = None) -> SendReport:
        assert dest.dicomweb is not None
        url = dest.dicomweb.url.rstrip("/") + "/studies"
        report = SendReport()
        dicom: list[DicomFile] = []
        for uri, path in files:
            try:
                dicom.append(read_header(uri, path))
            except (NotDicom, IsADirectoryError):
                report.skipped.append(uri)
            except FileNotFoundError:
                report.failed.append(FileFailure(uri, "file not found"))
            except OSError as exc:
                report.failed.append(FileFailure(uri, f"cannot read: {exc.strerror or exc}"))
            except Exception as exc:  # noqa: BLE001 - a broken DICOM file fails alone
                report.failed.append(FileFailure(uri, f"unreadable DICOM file: {_first_line(exc)}"))
        report.dicom_files = len(dicom) + len(report.failed)
        headers = {"Accept": "application/dicom+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        for batch in self._batches(dicom):
            if not self._send_batch(url, batch, headers, report):
                break
        return report

    def _batches(self, files: list[DicomFile]) -> Iterator[list[DicomFile]]:
        batch: list[DicomFile] = []
        size = 0
        for f in files:
            try:
                n = f.path.stat().st_size
            except OSError:
                n = 0
            if batch and (len(batch) >= self.batch_files or size + n > self.batch_bytes):
                yield batch
                batch, size = [], 0
            batch.append(f)
            size += n
        if batch:
            yield batch

    def _send_batch(self, url: str, batch: list[DicomFile], headers: dict[str, str], report: SendReport) -> bool:
        """One STOW-RS request; False when the task must stop (see the module rules)."""
        opened: list[tuple[DicomFile, IO[bytes], int]] = []
        try:
            for f in batch:  # opened before the request: a vanished file fails alone
                try:
                    fh = open(f.path, "rb")
                except FileNotFoundError:
                    report.failed.append(FileFailure(f.uri, "file vanished"))
                    continue
                except OSError as exc:
                    report.failed.append(FileFailure(f.uri, f"cannot read: {exc.strerror or exc}"))
                    continue
                opened.append((f, fh, fh.seek(0, 2)))
                fh.seek(0)
            if not opened:
                return True
            boundary = "clara-" + _random.token_hex(16)
            part_head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            tail = f"--{boundary}--\r\n".encode()
            length = sum(len(part_head) + size + 2 for _, _, size in opened) + len(tail)

            def body() -> Iterator[bytes]:
                for f, fh, size in opened:
                    yield part_head
                    left = size
                    while left:
                        chunk = fh.read(min(READ_CHUNK, left))
                        if not chunk:
                            raise OSError(f"{f.uri} shrank while being sent")
                        left -= len(chunk)
                        yield chunk
                    yield b"\r\n"
                yield tail

            request_headers = {**headers, "Content-Length": str(length),
                               "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
            try:
                rsp = self._client.post(url, content=body(), headers=request_headers)
            except httpx.HTTPError as exc:
                report.association_error = (f"STOW-RS to {url} failed: {_first_line(exc) or type(exc).__name__} "
                                            f"(after {report.attempted} of {report.dicom_files} files)")
                return False
            except OSError as exc:
                report.association_error = f"STOW-RS to {url} failed: {_first_line(exc)}"
                return False
        finally:
            for _, fh, _ in opened:
                fh.close()
        return self._account(url, rsp, [f for f, _, _ in opened], report)

    def _account(self, url: str, rsp: httpx.Response, sent: list[DicomFile], report: SendReport) -> bool:
        code = rsp.status_code
        if code in (200, 202, 409):
            try:
                answer = rsp.json() if rsp.content else {}
            except ValueError:
                answer = None
            if code == 200 and not isinstance(answer, dict):
                answer = {}  # 200 means every instance stored (PS3.18 10.5.3)
            if not isinstance(answer, dict):
                report.association_error = f"STOW-RS to {url} answered {code} without a DICOM JSON body"
                return False
            referenced = _uids(answer, REFERENCED_SOP_SEQUENCE)
            failed = {uid: reason for uid, reason in _failures(answer)}
            for f in sent:
                if f.sop_instance in failed:
                    reason = failed[f.sop_instance]
                    transient = reason is not None and 0xA700 <= reason <= 0xA7FF
                    why = f"STOW-RS failure reason 0x{reason:04X}" if reason is not None else "STOW-RS failed"
                    report.failed.append(FileFailure(f.uri, why, transient))
                elif f.sop_instance in referenced or (code == 200 and not referenced and not failed):
                    report.sent += 1
                else:
                    report.failed.append(FileFailure(f.uri, f"STOW-RS answered {code} without this instance"))
            return True
        detail = _brief_body(rsp)
        where = f"STOW-RS to {url} answered {code} {rsp.reason_phrase}" + (f": {detail}" if detail else "")
        report.association_error = where
        report.association_permanent = 400 <= code < 500 and code not in (408, 429)
        return False


def _uids(answer: dict[str, Any], sequence: str) -> set[str]:
    out = set()
    for item in (answer.get(sequence) or {}).get("Value") or []:
        values = (item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or []
        if values:
            out.add(str(values[0]))
    return out


def _failures(answer: dict[str, Any]) -> Iterator[tuple[str, int | None]]:
    for item in (answer.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []:
        values = (item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or []
        reasons = (item.get(FAILURE_REASON) or {}).get("Value") or []
        if values:
            try:
                reason = int(reasons[0]) if reasons else None
            except (TypeError, ValueError):
                reason = None
            yield str(values[0]), reason


def _brief_body(rsp: httpx.Response) -> str:
    try:
        text = rsp.text
    except Exception:  # noqa: BLE001 - undecodable body: say nothing of it
        return ""
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            text = str(data.get("Message") or data.get("detail") or data.get("message") or text)
    except ValueError:
        pass
    text = " ".join(text.split())
    return text[:200]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
