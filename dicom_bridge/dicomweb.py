"""The DICOMweb door to a PACS: QIDO-RS to find a study, WADO-RS to retrieve it.

QIDO-RS (PS3.18 10.6) asks level by level, like C-FIND (PS3.4 C.6.2): the studies,
then each study's series, then each series' instances, with the return keys of
:mod:`dicom_bridge.keys` as ``includefield``. Attributes go as tags (``00080050``):
PS3.18 10.6.1.2 also allows keywords, but Orthanc ignores a parameter it does not
know, and an ignored matching key would match every study.

WADO-RS (PS3.18 10.4) retrieves a study as ``multipart/related; type="application/dicom"``
(PS3.18 8.7.3.3.2, RFC 2387): each part, a Part 10 instance, is stored as soon as it has
arrived, so only one instance is held in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from email.message import Message
from io import BytesIO
from typing import Any

import httpx
import pydicom
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError

from dicom_bridge import keys
from dicom_bridge.errors import PacsError, PacsUnavailable, RetrieveFailed
from dicom_bridge.image_store import ImageStore, is_uid
from dicom_bridge.query import StudyQuery, unique
from mappings.imaging_study import Series, Study

DICOM_JSON = "application/dicom+json"  # PS3.18 F.2
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'  # PS3.18 8.7.3.3.2
UIDS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]


def attribute_id(keyword: str) -> str:
    """The QIDO-RS attribute ID of ``keyword``: its tag as 8 hex digits (PS3.18 10.6.1.2)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"not a DICOM keyword: {keyword}")
    return f"{tag:08X}"


class DicomWebClient:
    """QIDO-RS and WADO-RS against one DICOMweb base URL, e.g. ``http://pacs/dicom-web``."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._own = client is None
        self.http = client if client is not None else httpx.Client(timeout=timeout)
        self.timeout = timeout

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(self, query: StudyQuery) -> list[Study]:
        """The studies matching ``query``, each with its series and instances (PS3.18 10.6)."""
        if not query:
            raise ValueError("an empty query would match every study")
        studies = unique(self._search("studies", query.matching_keys(), keys.STUDY), "StudyInstanceUID")
        found = []
        for study in studies:
            base = f"studies/{_uid(study, 'StudyInstanceUID')}"
            series = []
            for answer in unique(self._search(f"{base}/series", {}, keys.SERIES), "SeriesInstanceUID"):
                path = f"{base}/series/{_uid(answer, 'SeriesInstanceUID')}/instances"
                instances = unique(self._search(path, {}, keys.INSTANCE), "SOPInstanceUID")
                series.append(Series(answer, instances))
            found.append(Study(study, series))
        return found

    def retrieve(self, study_uid: str, store: ImageStore) -> int:
        """Store every instance of the study (WADO-RS, PS3.18 10.4.1.1.1); how many were stored."""
        url = f"{self.base_url}/studies/{_checked(study_uid)}"
        stored = 0
        try:
            with self.http.stream("GET", url, headers={"Accept": MULTIPART_DICOM}, timeout=self.timeout) as answer:
                _check(answer, RetrieveFailed)
                for part in parts(answer.iter_bytes(), boundary(answer.headers.get("content-type", ""))):
                    try:  # the part is a Part 10 file: read its UIDs, keep its bytes as they are
                        header = pydicom.dcmread(BytesIO(part), stop_before_pixels=True, specific_tags=UIDS)
                        uids = (str(header.StudyInstanceUID), str(header.SeriesInstanceUID), str(header.SOPInstanceUID))
                        store.write(*uids, part)
                    except (InvalidDicomError, AttributeError, ValueError) as e:
                        raise RetrieveFailed(f"WADO-RS {url}: a part is not a DICOM instance: {e}") from e
                    stored += 1
        except httpx.TransportError as e:
            raise PacsUnavailable(f"WADO-RS {url}: {e!r}") from e
        return stored

    def _search(self, path: str, matching: dict[str, str], return_keys: Iterable[str]) -> list[Dataset]:
        """One QIDO-RS request (PS3.18 10.6.1): the answers as datasets; 204 means none."""
        params: list[tuple[str, str | int | float | bool | None]] = [(attribute_id(k), v) for k, v in matching.items()]
        params += [("includefield", attribute_id(k)) for k in return_keys]
        url = f"{self.base_url}/{path}"
        try:
            answer = self.http.get(url, params=params, headers={"Accept": DICOM_JSON}, timeout=self.timeout)
        except httpx.TransportError as e:
            raise PacsUnavailable(f"QIDO-RS {url}: {e!r}") from e
        _check(answer, PacsError)
        if answer.status_code == 204 or not answer.content.strip():
            return []
        try:
            body: Any = answer.json()
            return [Dataset.from_json(item) for item in body]
        except (ValueError, TypeError, KeyError) as e:
            raise PacsError(f"QIDO-RS {url}: not a DICOM JSON array: {e}") from e


def _check(answer: httpx.Response, error: type[PacsError]) -> None:
    if answer.status_code >= 500:
        raise PacsUnavailable(f"{answer.request.method} {answer.request.url}: HTTP {answer.status_code}")
    if answer.status_code >= 300:
        raise error(f"{answer.request.method} {answer.request.url}: HTTP {answer.status_code}")


def _checked(uid: str) -> str:
    """``uid`` if it is a UID (digits and dots, PS3.5 9.1), so that it is safe in a URL path."""
    if not is_uid(uid):
        raise PacsError(f"not a DICOM UID: {uid!r}")
    return uid


def _uid(ds: Dataset, keyword: str) -> str:
    return _checked(str(ds.get(keyword, "")))


def boundary(content_type: str) -> bytes:
    """The boundary parameter of a ``multipart/related`` Content-Type (RFC 2046 5.1.1)."""
    header = Message()
    header["content-type"] = content_type
    value = header.get_param("boundary")
    if header.get_content_type() != "multipart/related" or not isinstance(value, str) or not value:
        raise RetrieveFailed(f"not multipart/related with a boundary: {content_type!r}")
    return value.encode()


def parts(chunks: Iterable[bytes], boundary: bytes) -> Iterator[bytes]:
    """The bodies of a multipart body's parts (RFC 2046 5.1.1), each once it has arrived whole.

    Only the part being received is buffered. A body cut off before the close delimiter
    raises :class:`RetrieveFailed`, never yields half an instance.
    """
    delimiter = b"\r\n--" + boundary
    buffer = bytearray(b"\r\n")  # the first delimiter may open the body, without its CRLF
    searched = 0
    started = False
    for chunk in chunks:
        buffer += chunk
        while (at := buffer.find(delimiter, searched)) >= 0:
            segment = bytes(buffer[:at])
            del buffer[: at + len(delimiter)]
            searched = 0
            if started:  # the first segment is the preamble
                # A part: the rest of the delimiter line, its headers, an empty line, the body.
                _headers, blank, body = segment.partition(b"\r\n\r\n")
                if not blank:
                    raise RetrieveFailed("a multipart part without the empty line after its headers")
                yield body
            started = True
            if buffer.startswith(b"--"):
                return  # the close delimiter; what follows is the epilogue
        searched = max(0, len(buffer) - len(delimiter) - 1)
    if started and buffer.startswith(b"--"):
        return
    raise RetrieveFailed("the multipart body ended before its close delimiter")
