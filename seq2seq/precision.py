"""Numeric precision, in one place: which precision a run trains and decodes in, the gradient clipping
rule that mixed precision needs with fused AdamW, and the autocast that decoding runs under.

Per host: bf16 on CPUs that run it natively, fp32 everywhere else.

Machines of one kind differ. On a CPU with AVX-512-BF16 (or AMX), oneDNN runs LSTMs and matrix
products in bf16 under autocast, and training runs faster at the same BLEU per step. On an AVX2-only
CPU oneDNN cannot build the bf16 LSTM primitive and bf16 fails. So ``auto`` probes the host, once per
process, with a tiny LSTM forward and backward under CPU bf16 autocast, and picks from the result.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from seq2seq.errors import UserError

log = logging.getLogger(__name__)

# What decoding accepts: ``auto`` is bf16 on a CPU where the probe passes, fp32 elsewhere.
DECODING_PRECISIONS = ("fp32", "bf16", "auto")
# Lightning's names of CPU bf16 autocast: these need what the probe checks.
BF16_AUTOCAST_PRECISIONS = ("bf16-mixed", "bf16")
# fp16 autocast, which Lightning replaces by bf16 on a CPU.
FP16_AUTOCAST_PRECISIONS = ("16-mixed", "16", 16)


@dataclass(frozen=True)
class Bf16Probe:
    """What the probe found: ``error`` says why CPU bf16 autocast fails (None: it works); ``native``
    whether the CPU has bf16 instructions (without them oneDNN emulates bf16, which is not used)."""

    error: str | None
    native: bool
    capability: str

    @property
    def usable(self) -> bool:
        return self.error is None and self.native

    def __str__(self) -> str:
        cpu = f"CPU capability {self.capability}"
        if self.error is not None:
            return f"a bf16 LSTM fails under CPU autocast here ({cpu}): {self.error}"
        if not self.native:
            return f"the CPU has no native bf16 (AVX-512-BF16 or AMX; {cpu}): bf16 would be emulated"
        return f"a bf16 LSTM trains under CPU autocast here ({cpu}, native bf16)"


def has_native_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (x86: AVX-512-BF16 or AMX; other CPUs: oneDNN's check)."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_lstm_step() -> None:
    """Forward and backward of a tiny LSTM and projection under CPU bf16 autocast; raises where oneDNN
    cannot build the bf16 primitives, and ``FloatingPointError`` if the results are not finite."""
    generator = torch.Generator().manual_seed(0)
    lstm, projection = torch.nn.LSTM(8, 16, batch_first=True), torch.nn.Linear(16, 8)
    inputs = torch.randn(2, 3, 8, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, _ = lstm(inputs)
        loss = projection(outputs).float().log_softmax(dim=-1).mean()
    loss.backward()
    if not (loss.isfinite() and all(p.grad.isfinite().all() for p in lstm.parameters())):
        raise FloatingPointError("non-finite loss or gradients")


@functools.cache
def probe_cpu_bf16() -> Bf16Probe:
    """Whether CPU bf16 autocast works on this host, probed once per process (a fraction of a second).

    The probe leaves the global random state alone and runs its backward pass even when called under
    ``torch.no_grad()`` or ``torch.inference_mode()``.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            bf16_lstm_step()
    except (RuntimeError, FloatingPointError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return Bf16Probe(first_line, has_native_bf16(), capability)
    return Bf16Probe(None, has_native_bf16(), capability)


def on_cpu(accelerator: str | torch.device) -> bool:
    """Whether a Lightning accelerator name or a torch device means the CPU."""
    name = accelerator.type if isinstance(accelerator, torch.device) else str(accelerator)
    if name == "auto":
        return not torch.cuda.is_available()
    return name == "cpu"


def resolve_trainer_precision(precision: str | int, accelerator: str) -> str | int:
    """``trainer.precision`` as Lightning takes it. ``auto`` becomes ``bf16-mixed`` on a CPU where
    :func:`probe_cpu_bf16` finds bf16 usable and ``32-true`` otherwise (on a GPU too: the GPU configs
    set their own precision), and the log says which and why; fp16 (``16-mixed``) on a CPU is chosen
    the same way. Any other value is kept, but CPU bf16 autocast on a host where it fails raises a
    ValueError naming the option, before training starts.
    """
    if precision in FP16_AUTOCAST_PRECISIONS and on_cpu(accelerator):
        # A GPU config (trainer=gpu, ddp) run on the CPU: Lightning would switch to bf16-mixed without
        # asking whether the CPU runs it, so it is chosen as for auto.
        log.info("trainer.precision=%s: there is no fp16 autocast on CPU; choosing as for auto", precision)
        precision = "auto"
    if precision == "auto":
        if not on_cpu(accelerator):
            log.info("trainer.precision=auto: 32-true (accelerator %s; the probe is for CPUs)", accelerator)
            return "32-true"
        probe = probe_cpu_bf16()
        chosen = "bf16-mixed" if probe.usable else "32-true"
        log.info("trainer.precision=auto: %s, because %s", chosen, probe)
        return chosen
    if precision in BF16_AUTOCAST_PRECISIONS and on_cpu(accelerator) and probe_cpu_bf16().error is not None:
        raise UserError(
            f"trainer.precision={precision} cannot run on this CPU: {probe_cpu_bf16()};"
            " use trainer.precision=auto (picks 32-true here) or 32-true"
        )
    return precision


def resolve_decoding_precision(precision: str, device: str | torch.device, option: str = "precision") -> str:
    """``fp32`` or ``bf16`` for decoding on ``device``, from ``precision`` (fp32 | bf16 | auto).

    ``auto`` is bf16 on a CPU where :func:`probe_cpu_bf16` finds it usable, fp32 elsewhere (bf16 LSTMs
    on GPUs are unchecked). ``bf16`` on a CPU where bf16 fails raises a ValueError naming ``option``.
    """
    if precision not in DECODING_PRECISIONS:
        raise UserError(f"{option} must be one of {DECODING_PRECISIONS}, got {precision!r}")
    cpu = on_cpu(torch.device(device))
    if precision == "auto":
        chosen = "bf16" if cpu and probe_cpu_bf16().usable else "fp32"
        why = probe_cpu_bf16() if cpu else f"device {device}; the probe is for CPUs"
        log.info("%s=auto: %s, because %s", option, chosen, why)
        return chosen
    if precision == "bf16" and cpu and probe_cpu_bf16().error is not None:
        raise UserError(f"{option}=bf16 cannot run on this CPU: {probe_cpu_bf16()}; use fp32 or auto")
    return precision


def clip_gradients(
    optimizer: Optimizer, max_value: float, algorithm: str | None, scaler: torch.amp.GradScaler | None
) -> None:
    """Clip the gradients of ``optimizer``'s parameters: their total 2-norm to ``max_value``
    (``algorithm`` ``norm`` or None, Lightning's default) or each value to +-``max_value`` (``value``).

    Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales in its own step
    (fused AdamW), under bf16-mixed too, where nothing is scaled. Under 16-mixed the gradients are
    unscaled here first, by the run's grad ``scaler`` (on the device; its step then skips unscaling),
    so that the threshold applies to the true gradients.
    """
    if algorithm not in (None, "norm", "value"):
        raise UserError(f"trainer.gradient_clip_algorithm must be norm or value, got {algorithm!r}")
    if scaler is not None:
        scaler.unscale_(optimizer)
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(parameters, max_value)
    else:
        torch.nn.utils.clip_grad_norm_(parameters, max_value)


def decoding_autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on ``device`` when ``precision`` (resolved: fp32 or bf16) is bf16, else a no-op; the
    weights stay fp32 and are cast once per batch."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
