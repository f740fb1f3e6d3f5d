"""FaultSense: classify equipment sounds into fault classes.

Kept light on purpose: importing the package must not import torch, transformers,
gradio, litserve or wandb. Import submodules for what you need.
"""

__version__ = "0.1.0"
