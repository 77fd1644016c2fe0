"""The pipeline's stages, one module each; the table of them is resmem_ray/stage_table.py."""
