"""Every bounded wait of the live-update checks, named. A wait is a count of answered probes (or
samples) within a time limit; the numbers are the harness's policy, not QEMU's."""

from __future__ import annotations

# Traffic: the probe stream is up once this many probes were answered.
TRAFFIC_START_ANSWERS = 20
TRAFFIC_START_TIMEOUT_S = 30.0
PROBES_SENT_TIMEOUT_S = 30.0  # default limit for Traffic.wait_sent

# live_update: one interrupt window of `window` answered probes may take this long.
WINDOW_TIMEOUT_S = 120.0
# How long a vector that fired before a transfer may stay silent after it (the window after the
# transfer grows, while traffic flows, until each such vector fired again or this passed).
IRQ_WAIT_S = 30.0

# Probe measurement after a transfer: the stream recovered once RECOVERY_ANSWERS probes sent after
# the target resumed were answered; the window closes there, and CONFIRM_ANSWERS more probes sent
# after it must come back before unanswered probes of the window count as lost.
RECOVERY_ANSWERS = 20
RECOVERY_TIMEOUT_S = 15.0
CONFIRM_ANSWERS = 3
CONFIRM_TIMEOUT_S = 5.0

# The SSH session opened before the transfer must run a command after it within this (at most the
# configured command timeout).
SSH_AFTER_TRANSFER_S = 20.0

# Diagnosis of a guest that stopped answering.
DIAGNOSE_QMP_TIMEOUT_S = 10.0
DIAGNOSE_DMESG_TIMEOUT_S = 10.0
DIAGNOSE_CONSOLE_TIMEOUT_S = 20.0

# Guest kernel log at teardown.
DMESG_SSH_TIMEOUT_S = 20.0
DMESG_CONSOLE_TIMEOUT_S = 30.0
SNAPSHOT_CONSOLE_TIMEOUT_S = 60.0
CONSOLE_CONNECT_TIMEOUT_S = 10.0
CLOUD_INIT_POLL_S = 2.0  # a cloud image's boot: how often to look for cloud-init's result (within the boot timeout)

# Passthrough devices in the guest: the driver probes asynchronously; the DMA stream's log is read
# over SSH; at stop it reads every slot back.
DEVICE_APPEAR_TIMEOUT_S = 30.0
GUEST_SHELL_MARGIN_S = 10.0  # the SSH command that waits for a device may take this much longer
DMA_LOG_READ_TIMEOUT_S = 30.0
DMA_VERIFY_TIMEOUT_S = 120.0
DMA_ROUND_TIMEOUT_S = 120.0  # a few rounds of the DMA stream (nested emulation under load)
# a QEMU that must refuse its command line exits as it realizes the device (seconds, also nested)
QEMU_REFUSAL_TIMEOUT_S = 60.0

# Shutting QEMU down: a failed generation, and every generation at close.
FAILED_GENERATION_SHUTDOWN_S = 5.0
CLOSE_SHUTDOWN_S = 10.0

# Work done once per run across pytest-xdist workers (once.py): how long a worker waits for the one
# doing it (the accelerator probe boots a guest kernel, bounded at 20 s itself).
ONCE_LOCK_TIMEOUT_S = 120.0
