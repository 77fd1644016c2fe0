"""The built-in tasks; importing each registers it (registry.py)."""

from resmem_ray.tasks import image, lm, precomputed, regression, text  # noqa: F401
