"""Image captioning with a VGG-style encoder and a W_ih·v recurrent decoder."""
import os

# Images are decoded (loader workers, service threads) on the cores torch's OpenMP threads compute on, and by default
# an idle OpenMP thread spins for a while instead of sleeping, taking the core from the decoder: with 2 loader workers
# on 2 cores `captioner caption` spent 15.9 CPU ms per image with spinning and 12.5-13.1 without (bench/batch_cli.py),
# while the model alone ran as fast. It must be set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import Answer, Caption, Captioner
from .config import DecoderConfig, EncoderConfig, ModelConfig, PreprocessConfig, VQAConfig, preset
from .model import CaptionModel
from .tokenizer import Vocabulary
from .vqa import VQAInputError

__all__ = ["Answer", "Caption", "Captioner", "CaptionModel", "DecoderConfig", "EncoderConfig", "ModelConfig",
           "PreprocessConfig", "VQAConfig", "VQAInputError", "Vocabulary", "preset"]
__version__ = "0.1.0"
