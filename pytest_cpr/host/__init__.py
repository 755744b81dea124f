"""Host side: network namespaces and taps, VFIO probing and device binding."""
