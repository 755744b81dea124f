"""QEMU side of pytest-cpr: build probe, VM spec, process lifecycle and QMP."""
