"""Soak run, inside the virtual host on demand (not collected by the suite: name it explicitly):

    python -m pytest_cpr.vhost run --name soak -- tests/vhost/inner/soak_two_groups.py -k legacy

The CI subset's two-device test (NIC traffic + NVMe DMA through two transfers) ROUNDS times in one
L1, each round a fresh L2 guest: the failure rate of the nested setup, per round, in one run
(docs/virtual-host.md, "Known limits"). CPR_VHOST_APPEND adds L1 kernel parameters to compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pytest_cpr.vfio_fixtures import PassthroughGuest

sys.path.insert(0, str(Path(__file__).parents[2] / "hardware"))
from test_passthrough import test_nic_and_nvme_in_two_groups as two_groups

pytestmark = pytest.mark.cpr(mode="cpr-transfer")
ROUNDS = 8


@pytest.mark.vfio(role="nic")
@pytest.mark.vfio(role="nvme")
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_soak_two_groups(round_: int, cpr_vfio_guest: PassthroughGuest, cpr_thresholds: dict) -> None:
    two_groups(cpr_vfio_guest, cpr_thresholds)
