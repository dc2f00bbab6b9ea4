"""Test helpers that do not ship in the package."""
