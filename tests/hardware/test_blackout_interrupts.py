"""Interrupts raised in the blackout of a cpr-transfer reach the guest at once after it, in each
interrupt mode (MSI-X, plain MSI, INTx) and on each VFIO backend: the VFIO CPR series' fix of lost
interrupts while KVM is recreated (pytest_cpr.blackout).

The NIC is an e1000e (host config role nic-e1000e), whose guest driver takes its interrupt mode from
a parameter (e1000e.IntMode); the mode is asserted in the guest and on the host's vfio lines before
anything else. The transfer is held where no QEMU runs the guest (the target stopped from
pre-switchover until the source completed); there the peer port sends a burst of echo requests; the
guest must answer all of them within BLACKOUT_REPLY_BOUND_MS of the new QEMU's RESUME, with nothing
else on the NIC to make it interrupt again. `test_blackout_interrupt_check_catches_*` is the
control: the event is read away in the window, as the bug lost it, and the check fails.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_cpr.blackout import (
    BLACKOUT_REPLY_BOUND_MS,
    REPLY_WAIT_S,
    BlackoutBurst,
    Delivery,
    IrqMode,
    assert_delivered_promptly,
    assert_irq_mode,
    assert_raised_in_blackout,
    guest_command,
    load_e1000e,
)
from pytest_cpr.checks import CheckFailed
from pytest_cpr.host.vfio import host_vfio_irqs
from pytest_cpr.settings import CprSettings
from pytest_cpr.vfio_fixtures import PassthroughGuest, VfioDevices, boot_passthrough_guest
from pytest_cpr.vm import CprVM

pytestmark = [pytest.mark.cpr(mode="cpr-transfer"), pytest.mark.vfio(role="nic-e1000e")]


@pytest.fixture
def e1000e_guest(irq_mode: IrqMode, cpr_vfio: VfioDevices, cpr_vm_factory: Callable[..., CprVM],
                 cpr_settings: CprSettings) -> PassthroughGuest:
    """A guest with the host config's nic-e1000e passed through, its driver reloaded in `irq_mode`."""
    guest = boot_passthrough_guest(cpr_vfio, cpr_vm_factory, cpr_settings)
    load_e1000e(guest.vm, irq_mode)
    return guest


def _burst(guest: PassthroughGuest, irq_mode: IrqMode, request: pytest.FixtureRequest) -> BlackoutBurst:
    """The NIC connected to its peer port, its interrupt mode asserted, a burst answered while it runs."""
    nic = guest.nics[0]
    config, ifname = guest.connect_peer(nic)
    burst = BlackoutBurst(guest.vm, config, ifname, nic[1].address, paths=guest.devices.host.paths)
    idle_ms = burst.warm_up()  # the vectors are enabled and have fired: the host's vfio lines exist
    assert_irq_mode(irq_mode, guest.vm.run(guest_command(nic[1].guest_address)).stdout,
                    host_vfio_irqs([nic[1].address]), guest.vm.artifacts)
    request.node.user_properties += [("cpr_blackout_irq_mode", str(irq_mode)),
                                     ("cpr_blackout_idle_reply_ms", idle_ms)]
    return burst


def _record(delivery: Delivery, request: pytest.FixtureRequest) -> None:
    request.node.user_properties += [(f"cpr_t{delivery.result.index}_{k}", v) for k, v in delivery.numbers().items()]
    print(f"blackout burst: {delivery.numbers()}; reply ms after RESUME {delivery.reply_ms()}")


@pytest.mark.parametrize("irq_mode", [IrqMode.MSIX], ids=str)
def test_e1000e_answers_after_an_unheld_transfer(e1000e_guest: PassthroughGuest, irq_mode: IrqMode,
                                                 request: pytest.FixtureRequest) -> None:
    """Reference for the blackout tests: a cpr-transfer that is not held leaves the e1000e working (a
    burst answered before and after it), so a failure of a held one is the hold's doing."""
    guest = e1000e_guest
    with _burst(guest, irq_mode, request) as burst:
        result = guest.vm.transfer()
        assert result.status == "completed", result.error
        request.node.user_properties.append(("cpr_blackout_reply_ms_after_unheld", burst.warm_up()))
    guest.check_guest_log()


@pytest.mark.parametrize("irq_mode", list(IrqMode), ids=str)
def test_blackout_interrupt_reaches_guest_at_resume(e1000e_guest: PassthroughGuest, irq_mode: IrqMode,
                                                    request: pytest.FixtureRequest) -> None:
    """Two transfers, each held in its blackout with a burst of echo requests sent there: the NIC
    interrupts (the host's vfio line counts), the event waits in an eventfd of the new QEMU, and the
    guest answers every request within BLACKOUT_REPLY_BOUND_MS of RESUME; the guest's kernel log stays
    clean (no NIC reset, no unit hang)."""
    guest = e1000e_guest
    with _burst(guest, irq_mode, request) as burst:
        for _ in range(2):
            delivery = burst.through_transfer()
            _record(delivery, request)
            assert_raised_in_blackout(delivery, guest.vm.artifacts)
            assert_delivered_promptly(delivery, logs=guest.vm.artifacts)
    guest.check_guest_log()


# INTx is not in the control: a trigger read away leaves VFIO's INTx masked on the host (it waits for
# the guest's EOI, which never comes), so nothing would mend the NIC for the recovery part.
@pytest.mark.parametrize("irq_mode", [IrqMode.MSIX, IrqMode.MSI], ids=str)
def test_blackout_interrupt_check_catches_a_lost_interrupt(e1000e_guest: PassthroughGuest, irq_mode: IrqMode,
                                                           request: pytest.FixtureRequest) -> None:
    """Control: the events the burst left in the new QEMU's eventfds are read away in the window (what
    the old QEMU's handler did before the fix). The interrupt was raised in the blackout, yet the check
    fails naming the unanswered requests; the guest then gets the burst only late, when e1000e's
    watchdog (every 2 s) forces an interrupt, and answers a new burst at once."""
    guest = e1000e_guest
    with _burst(guest, irq_mode, request) as burst:
        delivery = burst.through_transfer(drop=True)
        _record(delivery, request)
        assert_raised_in_blackout(delivery, guest.vm.artifacts)
        assert delivery.window.dropped and all(delivery.window.dropped.values()), \
            f"nothing was read away in the window: {delivery.window}"
        with pytest.raises(CheckFailed, match=r"did not reach the guest promptly") as caught:
            assert_delivered_promptly(delivery, logs=guest.vm.artifacts)
        print(f"the check failed as it must: {caught.value}")
        late = delivery.answered_ms
        assert late is not None and late > BLACKOUT_REPLY_BOUND_MS, \
            f"the lost burst was not answered late within {REPLY_WAIT_S:g} s (the watchdog): {delivery.reply_ms()}"
        print(f"recovered: a new burst answered in {burst.warm_up()} ms")
    guest.check_guest_log()
