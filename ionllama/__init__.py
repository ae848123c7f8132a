"""ionLlama: a tokenizer-free byte-level language-model toolkit."""
__version__ = "0.1.0"

from .config import ModelConfig, make_config  # noqa: E402

__all__ = ["create_model", "build_model", "model_names", "ModelConfig", "make_config", "__version__"]
_FROM_REGISTRY = ("create_model", "build_model", "model_names")


def __getattr__(name: str):
    # torch is imported on first use, not with the package: `ionllama --help` answers at once, and a Ctrl-C during
    # the ~1.5 s torch import lands in the CLI's handler (one line), not in the entry point's import (a traceback)
    if name in _FROM_REGISTRY:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'ionllama' has no attribute {name!r}")
