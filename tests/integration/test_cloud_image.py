"""A distribution cloud image through --cpr-user-image, end to end: the image (`cpr-image build cloud`,
images/cloud) is built the way a distribution builds one, from Debian's packages (GPT disk, GRUB,
Debian's cloud kernel and initramfs, cloud-init with the NoCloud datasource, no user, key or network
in it). The guest boots through firmware, cloud-init configures it from the plugin's NoCloud seed,
and it then goes through three checked transfers like the default guest.

Run with the image: CPR_USER_IMAGE=$(cpr-image path cloud)/disk.qcow2 (ci/test.sh does, with its own
JUnit file); without a user image the test skips, naming that command.
"""

from __future__ import annotations

import json

import pytest

from pytest_cpr import checks
from pytest_cpr.errors import CprTimeout
from pytest_cpr.settings import CprSettings
from pytest_cpr.vm import CprVM

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


def _need_cloud_image(settings: CprSettings) -> None:
    if not settings.user_image:
        pytest.skip("no cloud image: build it with `cpr-image build cloud` and run with "
                    "CPR_USER_IMAGE=$(cpr-image path cloud)/disk.qcow2 (--cpr-user-image)")


@pytest.fixture
def cloud_vm(cpr_settings: CprSettings, request: pytest.FixtureRequest) -> CprVM:
    """The booted guest of --cpr-user-image (skip without one)."""
    _need_cloud_image(cpr_settings)
    vm: CprVM = request.getfixturevalue("cpr_vm")
    return vm


def test_cloud_image_configured_by_seed_keeps_ssh_stream_and_boot_through_three_transfers(
        cloud_vm: CprVM, cpr_thresholds: dict, request: pytest.FixtureRequest) -> None:
    """cloud-init took the plugin's seed (NoCloud, no errors, our key and pinned host key: the SSH
    session exists; the NIC renamed cpr0 by MAC), the kernel came through the image's bootloader;
    then three transfers under probe + TCP traffic with the default guest's checks."""
    vm = cloud_vm
    assert vm.machine.cloud_init_seconds is not None, "the boot of a cloud image waits for cloud-init to finish"
    request.node.user_properties.append(("cpr_cloud_init_done_s", round(vm.machine.cloud_init_seconds, 3)))
    result = json.loads(vm.run("cat /run/cloud-init/result.json").stdout)["v1"]
    assert result["datasource"].startswith("DataSourceNoCloud"), result
    assert result["errors"] == [], f"cloud-init reported errors: {result['errors']}"
    assert vm.run(f"ip -o addr show to {vm.guest_ip}").stdout.split()[1] == "cpr0", \
        "the seed's set-name must rename the NIC cpr0"
    cmdline = vm.run("cat /proc/cmdline").stdout
    assert "BOOT_IMAGE=" in cmdline, f"the kernel was not loaded by the image's GRUB: {cmdline}"
    boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    with vm.traffic() as traffic:
        results = [vm.live_update(traffic, **cpr_thresholds) for _ in range(3)]
    assert [(r.status, r.qemu_downtime_ms is not None, r.blackout_ms is not None,
             bool((r.interrupts or {}).get("after"))) for r in results] == [("completed", True, True, True)] * 3, \
        "each transfer completes with QEMU's downtime, the guest's blackout and NIC vectors firing after it"
    checks.assert_stream_intact(traffic.stream_result, vm.artifacts)
    checks.assert_clean_dmesg(vm.collect_dmesg(), vm.artifacts)
    assert vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id, "the guest rebooted"


def test_cloud_image_boot_timeout_names_how_far_the_boot_got(cpr_settings: CprSettings, cpr_vm_factory) -> None:
    """Control of the bounded first-boot wait: a boot timeout far too short for a first boot ends in
    one error naming the cloud image, how far its console shows the boot got, and the setting to raise."""
    _need_cloud_image(cpr_settings)
    vm: CprVM = cpr_vm_factory(boot_timeout=15.0)
    with pytest.raises(CprTimeout) as err:
        vm.boot()
    message = str(err.value)
    assert f"the cloud image {cpr_settings.user_image}: its console shows" in message, message
    assert "raise --cpr-boot-timeout" in message, message
