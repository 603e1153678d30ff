"""Shared pytest configuration."""

pytest_plugins = ["comfyui_fixtures"]
