"""control plane package."""
