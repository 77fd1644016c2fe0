"""A model trained elsewhere as a local Hugging Face folder (save_pretrained), loaded the
one way every task loads one: its config, an architecture of the kind the task takes,
every weight from the folder (never a hub), each wrong piece one line naming it."""

from __future__ import annotations

from resmem_ray.errors import ResMemError


def load_folder(path: str, auto_class, architectures: dict, wanted: str, kind: str):
    """(the model in eval mode, its config) of the folder `path`, holding a model that
    `auto_class` loads (one of the `architectures` mapping's values). `wanted` completes
    "holds a X, not ..." and `kind` names the model in the other messages."""
    from safetensors import SafetensorError
    from transformers import AutoConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ResMemError(f"model.path={path}: not a loadable transformers model: {str(e).splitlines()[0]}") from None
    archs = config.architectures or []
    if archs and not set(archs) & set(architectures.values()):
        raise ResMemError(f"model.path={path} holds a {archs[0]}, not {wanted}")
    try:
        model, loading = auto_class.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # RuntimeError: weights of other shapes
        raise ResMemError(f"model.path={path}: not a loadable {kind}: {str(e).splitlines()[0]}") from None
    missing = sorted(loading["missing_keys"])
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ResMemError(f"model.path={path} is not a whole {kind} ({archs[0] if archs else config.model_type}): "
                          f"no weights for {', '.join(missing[:3])}{more}")
    return model.eval(), config
