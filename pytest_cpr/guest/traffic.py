"""Old home of the traffic generators, which run on the host side of the namespace: see
pytest_cpr.net.traffic. Kept so `from pytest_cpr.guest.traffic import ...` goes on working; the
layer test allows this one upward import."""

from __future__ import annotations

from pytest_cpr.net.traffic import IcmpProbe as IcmpProbe
from pytest_cpr.net.traffic import Probe as Probe
from pytest_cpr.net.traffic import ProbeStats as ProbeStats
from pytest_cpr.net.traffic import StreamResult as StreamResult
from pytest_cpr.net.traffic import TcpStream as TcpStream
from pytest_cpr.net.traffic import probe_stats as probe_stats
