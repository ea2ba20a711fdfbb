"""Image captioning with a VGG-style encoder and a W_ih·v recurrent decoder."""
from .api import Answer, Caption, Captioner
from .config import DecoderConfig, EncoderConfig, ModelConfig, PreprocessConfig, VQAConfig, preset
from .model import CaptionModel
from .tokenizer import Vocabulary
from .vqa import VQAInputError

__all__ = ["Answer", "Caption", "Captioner", "CaptionModel", "DecoderConfig", "EncoderConfig", "ModelConfig",
           "PreprocessConfig", "VQAConfig", "VQAInputError", "Vocabulary", "preset"]
__version__ = "0.1.0"
