"""clara_dicom."""
