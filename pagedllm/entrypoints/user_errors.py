"""What a command prints for an error its user caused: one message that says what to do,
no traceback.

Such errors reach the commands as ValueError (a bad option value, a model that cannot be
loaded), OSError (a missing model or file; ModelNotFoundError is one), ImportError (a
package that is not installed), or an HTTP transport error (no server at --url). Anything
else is a bug and keeps its traceback; PAGEDLLM_TRACEBACK=1 shows it for these too.
"""

from __future__ import annotations

# Packages pagedllm imports only for some commands: what to install for each.
INSTALL_HINTS = {
    "accelerate": "pip install 'pagedllm[bench]' (transformers needs accelerate to load a GGUF model for the HF peer)",
    "triton": "pip install triton (the GPU attention kernels; CUDA builds of torch include it)",
    "openai": "pip install openai",
}


def user_message(error: BaseException) -> str | None:
    """The message to print instead of a traceback, or None for a bug."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        top = error.name.split(".")[0]
        return f"the package {top!r} is not installed: {INSTALL_HINTS.get(top, f'pip install {top}')}"
    if isinstance(error, (ValueError, OSError, ImportError)):
        return str(error) or type(error).__name__
    if type(error).__module__.split(".")[0] == "httpx":  # imported only when an error came from it
        import httpx

        if isinstance(error, httpx.TransportError):
            return f"cannot reach the server ({error or type(error).__name__}): start it, or check the URL you passed"
    return None
