"""Test helpers for defuser plugins: tiny models, conformance checks, pytest fixtures."""
