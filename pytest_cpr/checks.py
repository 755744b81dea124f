"""The assertions tests call after a transfer. Each failure message says what was expected, what
was seen, and where the logs are."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pytest_cpr.cpr import TransferResult
from pytest_cpr.guest.state import GuestSnapshot, dmesg_failures
from pytest_cpr.kinds import Phase
from pytest_cpr.net.traffic import StreamResult
from pytest_cpr.procfs import DROP_COUNTERS
from pytest_cpr.qemu.bugs import KnownBug


class CheckFailed(AssertionError):
    """A live-update property did not hold."""


def _where(logs: object) -> str:
    return f" (logs: {logs})" if logs else ""


def assert_completed(result: TransferResult, logs: object = None) -> None:
    if result.status != "completed":
        raise CheckFailed(f"transfer {result.index} ended {result.status!r}, expected 'completed': "
                          f"{result.error or result.qemu.get('error-desc')}{_where(logs)}")


def assert_source_quit(result: TransferResult, known: Sequence[KnownBug] = (), logs: object = None) -> None:
    """The old QEMU, told to quit after the transfer, exited with status 0. A crash that matches a
    known bug of this build (qemu/bugs.py; its own test shows it) is named in the result's notes."""
    if result.source_exit is None or result.source_exit == "exit code 0":
        return
    for bug in known:
        if result.source_exit == bug.source_exit:
            result.notes.append(f"old QEMU {result.source} ended {result.source_exit}: {bug.key} ({bug.summary})")
            return
    raise CheckFailed(f"transfer {result.index}: the old QEMU {result.source} ended {result.source_exit} "
                      f"when told to quit, expected exit code 0 (its stderr and the host kernel log say "
                      f"more){_where(logs)}")


def assert_qemu_quiet(result: TransferResult, known: Sequence[KnownBug] = (), logs: object = None) -> None:
    """Neither QEMU printed news on stderr during the transfer (qemu/stderr.py: trouble no QEMU of the
    guest said before the transfer). A line that is a known bug's signature is named in the notes."""
    bad = []
    for line in result.qemu_messages:
        bug = next((b for b in known if b.stderr and re.search(b.stderr, line)), None)
        if bug is None:
            bad.append(line)
        else:
            result.notes.append(f"QEMU said {line!r}: {bug.key} ({bug.summary})")
    if bad:
        raise CheckFailed(f"transfer {result.index} ({result.source} -> {result.target}) completed, but QEMU "
                          "reported trouble on stderr during it:\n  " + "\n  ".join(bad[:10]) + _where(logs))


def assert_old_qemu_answered(answers: dict[str, str], logs: object = None) -> None:
    """The old QEMU answered every query after the transfer (cpr.query_source) and is still alive."""
    died = [f"{cmd}: {a[len('died: '):]}" for cmd, a in answers.items() if a.startswith("died: ")]
    if died or not answers:
        raise CheckFailed(f"the old QEMU (postmigrate) did not survive the queries management software "
                          f"asks after a migration: {died[0] if died else 'none asked'}; answers: {answers}"
                          f"{_where(logs)}")


def assert_same_boot(before: GuestSnapshot, after: GuestSnapshot, max_pause_s: float = 30.0,
                     logs: object = None) -> None:
    """Same boot id, and uptime continued: it advanced, and by no more than host time allows. Each
    uptime was read somewhere between its command going out and its answer coming back, so the guest's
    advance is bounded by those host times (a slow SSH answer on a loaded host is no clock jump)."""
    if before.boot_id != after.boot_id:
        raise CheckFailed(f"guest rebooted: boot_id {before.boot_id} became {after.boot_id}{_where(logs)}")
    most = after.answered_t - before.host_t
    least = after.host_t - before.answered_t
    guest = after.uptime_s - before.uptime_s
    if guest <= 0:
        raise CheckFailed(f"guest uptime went from {before.uptime_s}s to {after.uptime_s}s: not continuous"
                          f"{_where(logs)}")
    if guest > most + 2.0 or guest < least - max_pause_s:
        raise CheckFailed(f"guest uptime advanced {guest:.2f}s while {least:.2f}-{most:.2f}s passed on the host "
                          f"(allowed pause {max_pause_s}s){_where(logs)}")


def assert_connectivity(result: TransferResult, logs: object = None) -> None:
    """The SSH session opened before the transfer answered after it, and probes came back."""
    if Phase.SSH_ANSWERED not in result.timeline:
        notes = "; ".join(result.notes) or "no answer"
        raise CheckFailed(f"transfer {result.index}: the SSH session opened before the transfer did not "
                          f"run a command after it: {notes}{_where(logs)}")
    if result.probe is not None and Phase.FIRST_PROBE_AFTER not in result.timeline:
        raise CheckFailed(f"transfer {result.index}: no probe was answered after the target resumed "
                          f"(probe stats {result.probe}){_where(logs)}")


def assert_stream_intact(stream: StreamResult | None, logs: object = None) -> None:
    if stream is None:
        raise CheckFailed("no TCP stream result: the stream was not started or not finished")
    if not stream.intact:
        raise CheckFailed(f"TCP stream not intact: sent {stream.bytes_sent} bytes sha256 {stream.sha256_sent}, "
                          f"guest received {stream.bytes_received} bytes sha256 {stream.sha256_received}"
                          f"{_where(logs)}")


def active_vectors(first: GuestSnapshot, second: GuestSnapshot, pattern: str) -> dict[str, int]:
    """Vectors matching `pattern` that fired between two snapshots, with how often."""
    a, b = first.irq_totals(pattern), second.irq_totals(pattern)
    return {k: b[k] - a.get(k, 0) for k in b if b[k] > a.get(k, 0)}


def assert_interrupts(pre: Sequence[GuestSnapshot], post: Sequence[GuestSnapshot], pattern: str,
                      logs: object = None) -> dict[str, dict[str, int]]:
    """Per-vector counts never go backwards across the transfer, and every vector that fired in the
    window before it (pre[0] -> pre[1]) fires again in the window after it (post[0] -> post[1])."""
    if not pre[-1].irq_totals(pattern):
        raise CheckFailed(f"no interrupt line in the guest matches {pattern!r}; lines: "
                          f"{sorted(v.name for v in pre[-1].interrupts.values())}{_where(logs)}")
    last, first_after = pre[-1].irq_totals(pattern), post[0].irq_totals(pattern)
    backwards = {k: (last[k], first_after.get(k)) for k in last if first_after.get(k, -1) < last[k]}
    if backwards:
        raise CheckFailed(f"interrupt counts went backwards across the transfer (before, after): {backwards}"
                          f"{_where(logs)}")
    fired_before = active_vectors(pre[0], pre[1], pattern)
    fired_after = active_vectors(post[0], post[1], pattern)
    silent = {k: n for k, n in fired_before.items() if k not in fired_after}
    if silent:
        raise CheckFailed("vectors that fired before the transfer stayed silent after it while traffic "
                          f"flowed: {silent} (fired before: {fired_before}, after: {fired_after}){_where(logs)}")
    return {"before": fired_before, "after": fired_after}


def carrier(counters: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """carrier_changes per interface out of VM.link_counters."""
    return {name: c["carrier_changes"] for name, c in counters.items() if "carrier_changes" in c}


def drops_grown(before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]],
                side: str) -> dict[str, dict[str, int]]:
    """The drop counters (procfs.DROP_COUNTERS) that grew across a transfer, per interface named
    '<side> <ifname>' (side: guest, or host: the probing namespace): where lost probes were dropped,
    if a NIC or a stack dropped them."""
    out: dict[str, dict[str, int]] = {}
    for name, counts in after.items():
        grew = {c: n - before.get(name, {}).get(c, n) for c, n in counts.items() if c in DROP_COUNTERS}
        if grew := {c: d for c, d in grew.items() if d}:
            out[f"{side} {name}"] = grew
    return out


def assert_no_link_flap(before: Mapping[str, int], after: Mapping[str, int],
                        result: TransferResult | None = None, logs: object = None) -> int:
    """The guest's NICs were not reset and their link did not flap across the transfer: each one's
    /sys/class/net/<if>/carrier_changes is the same after it as before. Returns the total change
    (also set as `result.carrier_changes`); an interface gone after the transfer counts as changed."""
    changed = {name: (n, after.get(name)) for name, n in before.items() if after.get(name) != n}
    delta = sum(abs((a if a is not None else n) - n) for n, a in changed.values())
    if result is not None:
        result.carrier_changes = delta
    if changed:
        which = f"transfer {result.index}: " if result is not None else ""
        counts = ", ".join(f"{name} carrier_changes {n} -> {'gone' if a is None else a}"
                           for name, (n, a) in changed.items())
        raise CheckFailed(f"{which}the guest NIC link went down across the transfer (a reset or a flap): {counts}"
                          f"{_where(logs)}")
    return delta


def assert_clean_dmesg(text: str, logs: object = None, link_settled_s: float | None = None) -> None:
    bad = dmesg_failures(text, link_settled_s)
    if bad:
        raise CheckFailed("guest kernel log reports driver trouble:\n  " + "\n  ".join(bad[:10]) + _where(logs))


def assert_dma_stall(result: TransferResult, max_dma_stall_ms: float | None, logs: object = None) -> None:
    """The guest's DMA stream stalled no longer than `max_dma_stall_ms` across the transfer (None: no
    bound; a stall not measured fails a bound)."""
    if max_dma_stall_ms is not None and (result.dma_stall_ms is None or result.dma_stall_ms > max_dma_stall_ms):
        raise CheckFailed(f"transfer {result.index}: DMA stalled {result.dma_stall_ms} ms across it, more than "
                          f"{max_dma_stall_ms:g} ms (max_dma_stall_ms){_where(logs)}")


def assert_thresholds(result: TransferResult, max_blackout_ms: float | None,
                      max_lost_probes: float | None, logs: object = None) -> None:
    probe = result.probe or {}
    if max_blackout_ms is not None and (result.blackout_ms is None or result.blackout_ms > max_blackout_ms):
        raise CheckFailed(f"transfer {result.index}: guest-visible blackout {result.blackout_ms} ms exceeds "
                          f"{max_blackout_ms} ms{_where(logs)}")
    if max_lost_probes is not None and probe.get("lost", 0) > max_lost_probes:
        phases = "" if "lost_in_downtime" not in probe else (
            f" ({probe['lost_before_stop']} sent before the source stopped, {probe['lost_in_downtime']} "
            f"in the downtime, {probe['lost_after_resume']} after the resume)")
        drops = ", ".join(f"{name} {c} +{d}" for name, grew in (result.link_drops or {}).items()
                          for c, d in grew.items())
        where = (f"; interfaces counted drops across it: {drops}" if drops else
                 "; no interface of the guest or the probing host counted a drop across it"
                 if result.link_drops is not None else "")
        if capture := probe.get("probe_capture_drops"):
            where += (f"; the harness's capture socket dropped {capture} frames (its buffer was full): a reply "
                      f"among them reads as a lost probe")
        raise CheckFailed(f"transfer {result.index}: {probe.get('lost')} probes lost{phases}, more than "
                          f"{max_lost_probes}{where}{_where(logs)}")
