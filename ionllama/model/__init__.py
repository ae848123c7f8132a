"""Model components (one module each) and the registered models."""
# Importing a model module registers it in ionllama.registry.
from . import dense  # noqa: F401
from . import ionllama_model  # noqa: F401
from . import bpe_gpt, mamba_byte  # noqa: F401  (baselines of the experiment matrix)
