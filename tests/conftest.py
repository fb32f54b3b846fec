"""Shared fixtures for the fast unit tests."""
