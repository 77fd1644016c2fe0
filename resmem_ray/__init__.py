"""resmem-ray: ResMem (residual memorization) as a suite of Ray jobs."""

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Versions of the parts that shape results, recorded in every run manifest."""
    import faiss
    import numpy
    import ray
    import torch

    return {"resmem_ray": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": numpy.__version__}
