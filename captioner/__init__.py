"""Image captioning with a VGG-style encoder and a W_ih·v recurrent decoder."""
from .api import Caption, Captioner
from .config import DecoderConfig, EncoderConfig, ModelConfig, PreprocessConfig, preset
from .model import CaptionModel
from .tokenizer import Vocabulary

__all__ = ["Caption", "Captioner", "CaptionModel", "DecoderConfig", "EncoderConfig", "ModelConfig",
           "PreprocessConfig", "Vocabulary", "preset"]
__version__ = "0.1.0"
