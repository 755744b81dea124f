"""pytest-cpr: end-to-end tests of QEMU live update (cpr-transfer) with real guests."""

__version__ = "0.1.0"
