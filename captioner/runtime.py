"""Where and how a model runs, decided in one place for every command: the device, the precision, and how many
batches run at once.

Precisions, the same names everywhere (API, `captioner caption/evaluate/serve --precision`, training's --amp):
    auto   bf16 where the hardware has native bf16 (CPUs with AVX-512 BF16 or AMX, GPUs from Ampere on), fp16 on
           older GPUs, fp32 otherwise
    fp32   no autocast;   bf16 / fp16   autocast to that type
Softmax, log-probabilities and beam scores are computed in fp32 under any of them (captioner.decoding). A model
loaded by Captioner.from_pretrained in bf16/fp16 holds its caption decoder's Linear weights in that dtype
(cast_weights): run it through the Captioner, which enters the autocast, or load it with precision="fp32".
"""
from __future__ import annotations

import contextlib
import platform

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(arg: str | torch.device | None, local_rank: int | None = None) -> torch.device:
    """--device as given (None or 'auto': CUDA when available). Under torchrun (``local_rank`` set) 'cuda' is
    always this process's GPU, whatever index was given (every rank on one GPU would break NCCL); the CUDA device
    chosen becomes the current one."""
    dev = default_device() if arg in (None, "auto") else torch.device(arg)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {arg}: CUDA is not available on this machine")
        if local_rank is not None:
            dev = torch.device("cuda", local_rank)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def model_workers(device: torch.device, threads: int, workers: int | None = None) -> tuple[int, int]:
    """(batches to run at once, torch threads of each), given ``threads`` torch threads in all and the ``workers``
    asked for (None: for the device). On a CPU with 2 or more threads: two batches, each with half of them. Beam
    search is mostly serial (Python and small matmuls), so while one batch decodes it leaves a core idle, and the
    other batch's encoder fills it; both also escape OpenMP's barriers, which wait for any thread that decoding or
    HTTP work has pre-empted. On the 2-core AMD EPYC, side by side: the batch CLI 1.00-1.11x images/s per pair
    with identical captions (bench/batch_cli.py), the service at saturation 71.0 against 54.1 images/s in one run
    and 70.3 against 64.4 in another, medians of 3 rounds (bench/bound.py), a lone request as fast. A GPU runs one
    batch at a time. Torch's thread count is per thread: each worker sets its own (set_thread_torch_threads)."""
    workers = workers or (2 if device.type == "cpu" and threads >= 2 else 1)
    return workers, max(1, threads // workers)


def set_thread_torch_threads(n: int) -> None:
    """This thread's torch intra-op threads, kept whatever other threads set later (a thread pool's initializer).
    Torch sets a thread up from the process-wide count at its first parallel op, which a set_num_threads elsewhere
    may have changed by then; asking for the count first does that set-up now, so the set below sticks."""
    torch.get_num_threads()
    torch.set_num_threads(n)


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC ('channels_last') for convolution weights and inputs: oneDNN (CPU) and cuDNN (tensor cores) run
    convolutions 1.4-2.2x faster in it (bench/encoder.py); results match NCHW to float rounding."""
    return torch.channels_last if channels_last else torch.contiguous_format


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix work runs natively (not emulated, which is several times slower than fp32)."""
    if device.type == "cuda":
        if torch.version.hip:  # ROCm GPUs that run torch have bf16
            return True
        # compute capability 8 (Ampere) on: is_bf16_supported() also says True where bf16 is only emulated
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    if platform.machine() in ("aarch64", "arm64"):  # Arm: the bf16 extension (Graviton 3, Neoverse V1 and later)
        try:
            return " bf16" in open("/proc/cpuinfo").read()
        except OSError:
            return False
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' (or training's 'off' = fp32) -> the concrete precision for ``device``: 'fp32', 'bf16' or 'fp16'."""
    device = torch.device(device)
    if precision == "off":
        return "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def cast_weights(module: torch.nn.Module, precision: str) -> None:
    """Store the weights of ``module``'s Linear layers in ``precision``'s dtype, in place, for a module that is only
    run, under autocast(precision) (run without it, or in another precision, it fails on mixed dtypes). Autocast
    casts each float32 weight again at every call in inference mode, where its cast cache is off: beam search cast
    W_hy (vocabulary x hidden) at every step (bench/decode.py in bf16 on CPU: 0.98-1.08x with the decoder's weights
    stored). These are the values autocast would compute, so outputs are bit-identical; fp32 changes nothing."""
    if precision == "fp32":
        return
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.to(DTYPES[precision])


def autocast(device: torch.device, precision: str):
    """Autocast context for a concrete precision ('fp32': none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"precision must be fp32, bf16 or fp16 here (resolve 'auto' first), got {precision!r}")
    return torch.autocast(device.type, dtype=DTYPES[precision])
