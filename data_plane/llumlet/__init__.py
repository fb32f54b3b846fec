"""llumlet package."""
