"""Guest side: SSH session, traffic generators and readers of guest state."""
