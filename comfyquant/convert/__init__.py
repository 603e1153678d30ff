"""comfyquant.convert."""
