"""Synthetic DICOM studies for tests, benchmarks and demos (no patient data)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

UID_ROOT = "1.2.826.0.1.3680043.10.1396."


def ct_slice(patient_id: str, study_uid: str, series_uid: str, index: int, rows: int = 512, cols: int = 512,
             transfer_syntax: str = ExplicitVRLittleEndian, extra: dict | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = "SYNTHETIC^" + patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.StudyDate = "20260101"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    rng = np.random.default_rng(index)
    ds.PixelData = rng.integers(0, 2000, size=(rows, cols), dtype=np.int16).tobytes()
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    return ds


def write_study(folder: str | Path, slices: int = 10, patient_id: str = "PAT-0001", rows: int = 512,
                cols: int = 512, study_uid: str | None = None, series: int = 1, extra: dict | None = None) -> list[Path]:
    """Write one study (``series`` series of ``slices`` slices each) as Part 10 files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(prefix=UID_ROOT)
    paths = []
    for s in range(series):
        series_uid = generate_uid(prefix=UID_ROOT)
        for i in range(slices):
            ds = ct_slice(patient_id, study_uid, series_uid, i, rows, cols, extra=extra)
            path = folder / f"s{s:02d}_{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths
