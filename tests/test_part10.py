"""dicom_bridge.part10 gives what pydicom and pynetdicom give, for every file pydicom ships."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_bridge.part10 import Header, file_meta, header


def encoded(ds: Dataset, implicit_vr: bool) -> bytes:
    """The Data Set as a C-STORE carries it: no preamble, no file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit_vr
    write_dataset(buffer, ds)
    return buffer.getvalue()


def sample(path: str) -> dict[bool, bytes] | None:
    """A pydicom test file with Study and Series UIDs, encoded implicit (True) and explicit (False)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
            return None
        return {implicit_vr: encoded(ds, implicit_vr) for implicit_vr in (True, False)}
    except Exception:
        return None  # pydicom's deliberately broken files, and those it cannot write again


@pytest.fixture(scope="module")
def samples() -> dict[str, dict[bool, bytes]]:
    """Every usable file pydicom ships (its own folder: get_testdata_files would try to download more)."""
    folder = Path(pydicom.data.__file__).parent / "test_files"
    found = {str(path): sample(str(path)) for path in sorted(folder.rglob("*.dcm"))}
    return {path: data for path, data in found.items() if data is not None}


@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45"])  # even and odd lengths: padded with NUL
@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.50"])
def test_file_meta_is_the_bytes_pynetdicom_writes(sop_instance: str, syntax: str) -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    ours = file_meta(ct, sop_instance, syntax)
    meta = create_file_meta(sop_class_uid=UID(ct), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(syntax))
    theirs = encode_file_meta(meta)
    assert ours == b"\0" * 128 + b"DICM" + theirs


def test_a_file_written_with_it_reads_back(tmp_path: Path) -> None:
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    target = tmp_path / "ct.dcm"
    target.write_bytes(file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ImplicitVRLittleEndian) + encoded(ds, True))
    back = pydicom.dcmread(target)
    assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.PixelData == ds.PixelData and back.PatientName == ds.PatientName


def test_the_samples_are_many(samples: dict[str, dict[bool, bytes]]) -> None:
    assert len(samples) > 50  # so that the comparison below means something


@pytest.mark.parametrize("implicit_vr", [True, False], ids=["implicit", "explicit"])
def test_header_agrees_with_pydicom_or_defers_to_it(implicit_vr: bool, samples: dict[str, dict[bool, bytes]]) -> None:
    walked = deferred = 0
    for path, data in samples.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found = header(data[implicit_vr], implicit_vr)
        if found is None:
            deferred += 1
            continue
        walked += 1
        accession = str(ds.get("AccessionNumber", "") or "").strip()
        assert found == Header(ds.StudyInstanceUID, ds.SeriesInstanceUID, accession), path
    assert walked > 3 * deferred  # most real headers take the fast path


def test_an_undefined_length_sequence_before_the_uids_is_left_to_pydicom() -> None:
    ds = Dataset()
    ds.ReferencedStudySequence = [Dataset()]
    ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID = "1.2.3"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.5"
    data = encoded(ds, True)
    assert header(data, True) == Header("1.2.3.4", "1.2.3.4.5", "")  # pydicom writes defined lengths
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    undefined = b"\x08\x00\x10\x11\xff\xff\xff\xff" + item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert header(undefined + encoded(_uids(), True), True) is None


def _uids() -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.5"
    return ds


def test_truncated_or_uidless_data_is_left_to_pydicom() -> None:
    data = encoded(_uids(), False)
    assert header(data, False) == Header("1.2.3.4", "1.2.3.4.5", "")
    assert all(header(data[:cut], False) is None for cut in range(len(data)))
    ds = Dataset()
    ds.AccessionNumber = "ACC-1"
    assert header(encoded(ds, True), True) is None


def test_a_non_ascii_accession_is_left_to_pydicom() -> None:
    ds = _uids()
    ds.SpecificCharacterSet, ds.AccessionNumber = "ISO_IR 100", "ACC-Ü"
    assert header(encoded(ds, False), False) is None
