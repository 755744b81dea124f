"""SSH into the guest with paramiko: a per-session ed25519 key, the guest's host key pinned.

The guest prints the host key it generated at boot on its console ("CPR-HOSTKEY ..."); the
harness pins exactly that key, so a different machine answering on the address is rejected.
"""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko

from pytest_cpr.errors import CprError, CprTimeout, QemuExited


@dataclass
class CommandResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str

    def check(self) -> CommandResult:
        if self.exit_code != 0:
            raise AssertionError(f"guest command {self.command!r} failed with exit code {self.exit_code}:\n"
                                 f"{self.stderr or self.stdout}")
        return self


class SessionKey:
    """An ephemeral ed25519 key pair kept in a private (0700) directory."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / "id_ed25519"
        if not self.path.exists():
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ed25519

            key = ed25519.Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
            self.path.touch(mode=0o600)
            self.path.write_bytes(pem)
        self.key = paramiko.Ed25519Key.from_private_key_file(str(self.path))

    @property
    def public_base64(self) -> str:
        return str(self.key.get_base64())


class GuestSSH:
    """One SSH connection to the guest, kept open across transfers."""

    def __init__(self, address: str, key: SessionKey, host_key_line: str,
                 sock_factory: Callable[[float], socket.socket], command_timeout: float,
                 alive: Callable[[], str | None] | None = None) -> None:
        """`alive`: None while the guest's QEMU runs, else why it is gone; a command waiting on a
        guest whose QEMU exited ends at once with that reason instead of at its timeout."""
        self.address = address
        self.alive = alive
        self.key = key
        kind, blob = host_key_line.split()[:2]
        self.host_key = paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
        self.sock_factory = sock_factory
        self.command_timeout = command_timeout
        self.client: paramiko.SSHClient | None = None

    def connect(self, timeout: float, alive: Callable[[], str | None] | None = None) -> float:
        """Connect, retrying while sshd is not yet listening; returns seconds it took."""
        start = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - start < timeout:
            if alive is not None and (reason := alive()):
                raise CprTimeout(f"SSH to {self.address}: gave up: {reason}")
            client = paramiko.SSHClient()
            client.get_host_keys().add(self.address, self.host_key.get_name(), self.host_key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                sock = self.sock_factory(min(5.0, timeout))
                client.connect(self.address, username="root", pkey=self.key.key, sock=sock,
                               timeout=10, banner_timeout=20, auth_timeout=20, look_for_keys=False,
                               allow_agent=False)
            except paramiko.AuthenticationException as exc:
                client.close()
                raise CprError(f"SSH to {self.address}: the guest refused the session key ({exc}): its "
                               "authorized key is not this session's (cpr.sshkey= on the kernel command "
                               "line must carry the session's public key)") from None
            except paramiko.BadHostKeyException as exc:
                client.close()
                raise CprError(f"SSH to {self.address}: host key differs from the one the guest printed "
                               f"on its console ({exc}): another machine answers on this address") from None
            except (OSError, paramiko.SSHException) as exc:
                client.close()
                last = exc
                time.sleep(0.1)
                continue
            transport = client.get_transport()
            assert transport is not None
            transport.set_keepalive(0)
            self.client = client
            return time.monotonic() - start
        raise CprTimeout(f"SSH to {self.address} not ready within {timeout:.0f}s (last error: {last})")

    @property
    def transport(self) -> paramiko.Transport:
        if self.client is None or (transport := self.client.get_transport()) is None:
            raise AssertionError(f"SSH to {self.address} is not connected")
        return transport

    def is_active(self) -> bool:
        return self.client is not None and self.transport.is_active()

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> CommandResult:
        """Run a command; raises CprTimeout if it does not finish in time."""
        timeout = timeout or self.command_timeout
        self._check_alive(command)
        try:
            channel = self.transport.open_session(timeout=timeout)
            channel.settimeout(timeout)
            channel.exec_command(command)
        except (paramiko.SSHException, TimeoutError) as exc:
            self._check_alive(command)
            if not self.transport.is_active():
                raise
            raise CprTimeout(f"guest command {command!r} did not start within {timeout:.0f}s "
                             f"(sshd did not answer: {exc})") from None
        deadline = time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        checked = time.monotonic()
        try:
            while True:
                if time.monotonic() - checked > 1.0:
                    self._check_alive(command)
                    checked = time.monotonic()
                if channel.recv_ready():
                    out += channel.recv(65536)
                elif channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                elif channel.exit_status_ready():
                    # the exit status can come before the last output: read each stream to its end (an
                    # empty read), else a long output is cut (a guest dmesg ended at 3.5 s of boot)
                    while chunk := channel.recv(65536):
                        out += chunk
                    while chunk := channel.recv_stderr(65536):
                        err += chunk
                    break
                elif time.monotonic() > deadline:
                    raise CprTimeout(f"guest command {command!r} did not finish within {timeout:.0f}s")
                else:
                    channel.status_event.wait(0.01)
            code = channel.recv_exit_status()
        finally:
            channel.close()
        result = CommandResult(command, code, out.decode(errors="replace"), err.decode(errors="replace"))
        return result.check() if check else result

    def _check_alive(self, command: str) -> None:
        if self.alive is not None and (reason := self.alive()):
            raise QemuExited(f"guest command {command!r}: the guest is gone: {reason}")

    def start(self, command: str) -> paramiko.Channel:
        """Start a long-running command; the caller reads and closes the channel."""
        channel = self.transport.open_session(timeout=self.command_timeout)
        channel.exec_command(command)
        return channel

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
