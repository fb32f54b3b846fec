"""data plane package."""
