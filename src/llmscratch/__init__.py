"""llmscratch: a GPT built by hand — tokenizer, data, model, training, fine-tuning, generation.

Quick use::

    import llmscratch
    model, tokenizer = llmscratch.load("runs/quickstart")
    print(llmscratch.generate(model, tokenizer, "The module", max_new_tokens=40))
"""

from llmscratch.checkpoint import load, save_model
from llmscratch.config import PRESETS, ModelConfig
from llmscratch.errors import UserError
from llmscratch.generate import generate, stream
from llmscratch.model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "PRESETS", "ModelConfig", "UserError", "generate", "load", "save_model", "stream"]
