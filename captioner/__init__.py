"""Image captioning with a VGG-style encoder and a W_ih·v recurrent decoder."""
import os

# Images are decoded (loader workers, service threads) on the cores torch's OpenMP threads compute on, and by default
# an idle OpenMP thread spins for a while instead of sleeping, taking the core from the decoder: with 2 loader workers
# on 2 cores `captioner caption` spent 15.9 CPU ms per image with spinning and 12.5-13.1 without (bench/batch_cli.py),
# while the model alone ran as fast. It must be set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# the public names load on first use (PEP 562), so `import captioner` (and `captioner --help`) does not import torch
_EXPORTS = {"Answer": "api", "Caption": "api", "Captioner": "api", "CaptionModel": "model", "DecoderConfig": "config",
            "EncoderConfig": "config", "GenerationConfig": "generation", "GenerationConfigError": "generation",
            "ImageFeatures": "features", "ModelConfig": "config", "PreprocessConfig": "config", "VQAConfig": "config",
            "preset": "config", "Vocabulary": "tokenizer", "VQAInputError": "vqa"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
