"""Network traffic that runs on the host side of a guest's namespace (probes, TCP streams)."""
