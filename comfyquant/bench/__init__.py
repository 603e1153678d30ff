"""Benchmarks shipped with the package (``comfyquant bench``): GPU shape sweeps and their plots. Nothing in the
converter or runtime imports this package."""
