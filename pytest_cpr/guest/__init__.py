"""Guest side: the SSH session and readers of guest state (traffic runs on the host side: pytest_cpr.net)."""
