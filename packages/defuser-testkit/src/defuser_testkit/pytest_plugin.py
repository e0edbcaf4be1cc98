"""pytest fixtures for defuser plugin tests (filled in below)."""
