"""Shared pytest configuration."""

pytest_plugins = ["comfyui_fixtures", "comfyui_server_fixtures", "cpu_int8_guard"]
