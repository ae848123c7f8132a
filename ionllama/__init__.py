"""ionLlama: a tokenizer-free byte-level language-model toolkit."""
__version__ = "0.1.0"

from .config import ModelConfig, make_config  # noqa: E402
from .registry import build_model, create_model, model_names  # noqa: E402

__all__ = ["create_model", "build_model", "model_names", "ModelConfig", "make_config", "__version__"]
