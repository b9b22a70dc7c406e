"""Stand-in for an AI operator: copies every input DICOM instance to the output
folder as a new series (new Series and SOP Instance UIDs, SeriesDescription
"AI RESULT"), like a segmentation that writes its result as DICOM.

    python ai_standin.py --input DIR --output DIR
"""
import argparse
import sys
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

PREFIX = "1.2.826.0.1.3680043.10.1396.9."


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    out = Path(args.output)
    series = generate_uid(prefix=PREFIX)
    count = 0
    for path in sorted(Path(args.input).rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid(prefix=PREFIX)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = "AI RESULT"
        ds.SeriesNumber = 900
        ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        count += 1
    (out / "report.txt").write_text(f"{count} instances\n")  # not DICOM: skipped by the export agent
    print(f"wrote {count} instances of series {series}")
    return 0 if count else 3


if __name__ == "__main__":
    sys.exit(main())
