"""Helpers shared by the unit, integration and cluster tests."""
