"""FaultSense: classify equipment sounds into fault classes.

Kept light on purpose: importing the package must not import torch, transformers,
gradio, litserve or wandb. Import submodules for what you need.
"""

from pathlib import Path

__version__ = "0.1.0"

# Hydra's config folder, absolute: a relative `config_path` is resolved against the
# module and breaks when an entry point runs as an installed console script.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
