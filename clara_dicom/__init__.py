"""clara_dicom: code shared by the adapter, the operator and the Results Service."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clara-dicom")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0"

# The image `make image` builds (tools/image/build.sh tags it with the package version).
DEFAULT_IMAGE = f"clara-dicom:{__version__}"
