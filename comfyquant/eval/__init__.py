"""comfyquant.eval."""
