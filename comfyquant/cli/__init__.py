"""comfyquant.cli."""
