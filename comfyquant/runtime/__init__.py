"""comfyquant.runtime."""
