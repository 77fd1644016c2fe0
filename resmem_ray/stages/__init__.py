"""The pipeline's stages, one module each; the table of them is pipeline.py."""
