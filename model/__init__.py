"""The hybrid backbone: `LM` (a stack of pre-norm blocks whose mixers follow a layer pattern) and its config."""
from model.config import ModelConfig
from model.lm import LM

__all__ = ["LM", "ModelConfig"]
