"""Exceptions with messages a user can act on: what failed, the setting involved, the fix."""

from __future__ import annotations


class CprError(Exception):
    """Base class of every error pytest-cpr raises on purpose."""


class CprSettingError(CprError):
    """A setting or input is wrong; the message names the setting and the fix."""


class CprUnsupported(CprError):
    """The host or a QEMU build lacks a feature; tests turn this into a skip with its message."""


class CprTimeout(CprError):
    """A bounded wait expired: the message says what was awaited, for how long, and where the logs are."""


class BootHung(CprTimeout):
    """The guest's QEMU runs but the guest did not finish booting in time."""


class QemuExited(CprError):
    """A QEMU process exited while something was waiting on it."""


class TransferFailed(CprError):
    """cpr-transfer did not complete; carries the partial timeline."""

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


class QemuQuitFailed(CprError):
    """The QEMU running the guest did not end with exit code 0 when told to quit."""
