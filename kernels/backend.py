"""Which implementation an op runs: the Triton kernels or the chunked PyTorch path.

The rule: CUDA tensors take Triton, every other device takes the chunked PyTorch path.
The environment variable BATON_KERNELS overrides it:
  BATON_KERNELS=triton  forces Triton; on CPU tensors this needs TRITON_INTERPRET=1 (Triton's
                        interpreter), set before the first kernel call: Triton decides at decoration
                        time whether a kernel is compiled or interpreted, and the Triton modules are
                        imported lazily on first use.
  BATON_KERNELS=torch   forces the PyTorch path on every device.
  unset or "auto"       applies the rule.
"""
import importlib.util
import os

import torch

BACKEND_ENV = "BATON_KERNELS"
BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """Whether Triton kernels run in the interpreter (on CPU tensors, for the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_backend(x: torch.Tensor) -> str:
    """'triton' or 'torch' for an op whose inputs live on x's device."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{BACKEND_ENV}=triton but the triton package is not installed")
        if not x.is_cuda and not interpret_mode():
            raise ValueError(f"{BACKEND_ENV}=triton on {x.device} tensors needs TRITON_INTERPRET=1 "
                             "(set before the first kernel call)")
        return "triton"
    return "triton" if x.is_cuda and triton_available() else "torch"


def use_triton(x: torch.Tensor) -> bool:
    return kernel_backend(x) == "triton"
