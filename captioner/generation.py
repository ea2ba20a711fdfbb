"""How captions are generated: one frozen, validated GenerationConfig. The Python API, the batch CLI, the Ray engine
and the REST service each build one from their own input and hand it unchanged to CaptionModel.generate, so an
option means the same everywhere and is checked in one place. Torch-free: ``captioner --help`` imports it.

    GenerationConfig(beam_size=5, num_captions=3)            # GenerationConfigError if invalid, naming the field
    GenerationConfig.from_dict(json.load(f)).to_dict()       # JSON round trip
"""
from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


class GenerationConfigError(ValueError):
    """An invalid generation option; ``field`` names it (the first, when several keys are unknown)."""

    def __init__(self, field: str | None, msg: str) -> None:
        super().__init__(msg)
        self.field = field


def _option(default: Any, help: str, **bounds: float) -> Any:
    # help and bounds are read by the CLI (flags) and the service (request schema) as well as __post_init__
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(frozen=True)
class GenerationConfig:
    beam_size: int = _option(3, "beam width (1 = greedy)", ge=1)
    num_captions: int = _option(1, "captions per image, best first; at most beam_size unless sampling", ge=1)
    max_length: int | None = _option(None, "most words in a caption (default: the model's)", ge=1)
    length_penalty: float = _option(0.0, "beam search: rank captions by log_prob / length ** length_penalty")
    block_trigrams: bool = _option(False, "beam search: never repeat a word trigram within a caption")
    sample: bool = _option(False, "sample num_captions independent captions instead of beam search")
    temperature: float = _option(1.0, "sampling temperature (lower: closer to greedy)", gt=0)
    top_k: int = _option(0, "sample from the k most likely words (0 = all)", ge=0)
    attention: bool = _option(False, "each caption's words and, per word, its attention map over the image grid "
                                     "(attention models only)")

    def __post_init__(self) -> None:
        for f in fields(self):
            # stored as the declared type (a numpy int as int, 1 as 1.0): equal configs hash and serialise alike
            object.__setattr__(self, f.name, _checked(f.name, getattr(self, f.name), f.type, f.metadata))
        if not self.sample and self.num_captions > self.beam_size:
            n, b = self.num_captions, self.beam_size
            raise GenerationConfigError("num_captions", f"num_captions ({n}) must be at most beam_size ({b}) unless "
                                        f"sample is true: use beam_size {n} for {n} beam-search captions, or sample "
                                        "for independent samples")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GenerationConfig":
        if not isinstance(d, Mapping):
            raise GenerationConfigError(None, f"generation options must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(OPTIONS), key=str)
        if unknown:
            raise GenerationConfigError(str(unknown[0]), f"unknown generation options {unknown}; known: "
                                                         f"{', '.join(OPTIONS)}")
        return cls(**d)

    @classmethod
    def from_args(cls, args: Any) -> "GenerationConfig":
        """The options an argparse Namespace holds (the CLI's flags are the field names); defaults for the rest."""
        given = vars(args)
        return cls(**{k: given[k] for k in OPTIONS if k in given})

    def replace(self, **changes: Any) -> "GenerationConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def canonical(self) -> "GenerationConfig":
        """This config with the options its search ignores at their defaults, so configs that give the same
        captions compare equal (the service batches requests by it)."""
        if self.sample:
            return self.replace(beam_size=1, length_penalty=0.0, block_trigrams=False)
        ignored = dict(temperature=1.0, top_k=0)
        if self.beam_size == 1:  # greedy search
            ignored.update(length_penalty=0.0, block_trigrams=False)
        return self.replace(**ignored)


OPTIONS = tuple(f.name for f in fields(GenerationConfig))


def with_options(generation: GenerationConfig | None, options: Mapping[str, Any]) -> GenerationConfig:
    """``generation`` (default: GenerationConfig()) with ``options`` changed: the keyword shortcuts of
    Captioner.caption and captioner.ray.caption_dataset."""
    if generation is None:
        generation = GenerationConfig()
    elif not isinstance(generation, GenerationConfig):
        raise GenerationConfigError("generation", "generation must be a GenerationConfig, got "
                                                  f"{type(generation).__name__}")
    return generation.replace(**options) if options else generation


def _checked(name: str, value: Any, kind: str, bounds: Mapping[str, Any]) -> Any:
    """``value`` as the annotation ``kind`` says ('int', 'float', 'bool', optionally '| None'), within ``bounds``."""
    base, _, optional = kind.partition(" | ")
    if value is None and optional:
        return None
    if base == "bool":
        ok, want = isinstance(value, bool), "true or false"
    elif base == "int":
        ok, want = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
    else:
        ok, want = isinstance(value, numbers.Real) and not isinstance(value, bool), "a finite number"
        try:
            ok = ok and math.isfinite(value)
        except OverflowError:  # an int beyond float's range
            ok = False
    if not ok:
        raise GenerationConfigError(name, f"{name} must be {want}{' or None' if optional else ''}, got {_show(value)}")
    value = {"bool": bool, "int": int, "float": float}[base](value)
    if "ge" in bounds and value < bounds["ge"]:
        raise GenerationConfigError(name, f"{name} must be >= {bounds['ge']}, got {value}")
    if "gt" in bounds and value <= bounds["gt"]:
        raise GenerationConfigError(name, f"{name} must be > {bounds['gt']}, got {value}")
    return value


def _show(value: Any) -> str:
    try:
        return reprlib.repr(value)  # a long string or number, abridged
    except ValueError:  # an int past Python's digit limit for str()
        return f"a {value.bit_length()}-bit integer"
