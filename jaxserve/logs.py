"""Logging for the `jaxserve` command: the format, and quiet start-ups and shutdowns.

On a machine without an accelerator, JAX and its plugins report what they did not find: libtpu's
"Unable to initialize backend 'tpu'", the CUDA plugin's C++ "cudart_stub ... Could not find cuda
drivers" lines and a traceback from its version check, and the compilation cache its "Resetting
cache" lines. `quiet_startup()` drops exactly those, and only where the hardware they look for is
absent (libtpu is not even loaded where no TPU chip is attached), so that a real TPU or GPU
that fails to start is still reported. Nothing here sets JAX_PLATFORMS: on a TPU VM or a GPU
host JAX still finds the accelerator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import logging
import os
import pkgutil

FORMAT = "%(levelname)s %(asctime)s %(name)s] %(message)s"
DATEFMT = "%H:%M:%S"

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of Google's vendor id


def tpu_attached() -> bool:
    """Whether a TPU chip is attached (a PCI device of Google's), without loading libtpu."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def nvidia_gpu_visible() -> bool:
    """Whether an NVIDIA GPU device node is visible (what JAX checks before starting CUDA)."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl") \
        or os.path.exists("/dev/dxg")


def platform_guess() -> str:
    """The platform JAX will pick, without initialising a backend: JAX_PLATFORMS' first entry,
    the initialised backend, else tpu, cuda or cpu by the hardware attached."""
    chosen = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if chosen:
        return {"gpu": "cuda"}.get(chosen, chosen)
    with contextlib.suppress(Exception):
        from jax._src import xla_bridge  # NOTE: private, read only to avoid initialising

        if xla_bridge._backends:
            import jax

            return jax.default_backend()
    if tpu_attached():
        return "tpu"
    return "cuda" if nvidia_gpu_visible() else "cpu"


class _DropProbeNoise(logging.Filter):
    """Drops JAX's reports of accelerators that are not attached, and cache resets."""

    def __init__(self, tpu: bool, gpu: bool):
        super().__init__()
        self.tpu, self.gpu = tpu, gpu

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Resetting cache"):
            return False
        if message.startswith("Unable to initialize backend") and record.levelno < logging.WARNING:
            platform = str(record.getMessage()).split("'")[1:2]
            if platform == ["tpu"] and not self.tpu or platform == ["cuda"] and not self.gpu:
                return False
        if message.startswith("Jax plugin configuration error") and not self.gpu \
                and not os.environ.get("JAX_SKIP_CUDA_CONSTRAINTS_CHECK"):  # deviceless: keep
            return "cuda" not in record.getMessage()
        return True


class _DropCleanCancel(logging.Filter):
    """uvicorn's "Cancel 0 running task(s)" at shutdown is an ERROR that cancelled nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Cancel %s running task")
                    and record.args and record.args[0] == 0)


def quiet_startup() -> None:
    """Install the filters above and import the CUDA plugin with its C++ lines silenced when no
    NVIDIA GPU is visible. Call before JAX initialises its backends."""
    # NOTE: transformers announces "PyTorch was not found..." at import when torch is absent;
    # jaxserve serves without torch by design (it needs transformers' tokenizers only).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    tpu, gpu = tpu_attached(), nvidia_gpu_visible()
    probe = _DropProbeNoise(tpu, gpu)
    for name in ("jax._src.xla_bridge", "jax._src.compilation_cache"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropProbeNoise) for f in logger.filters):
            logger.addFilter(probe)
    uvicorn_error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropCleanCancel) for f in uvicorn_error.filters):
        uvicorn_error.addFilter(_DropCleanCancel())
    if not gpu:
        _import_cuda_plugins_silently()
    if not tpu and not os.environ.get("JAX_PLATFORMS") and not os.environ.get("JAX_FORCE_TPU_INIT"):
        _skip_tpu_backend()


def _skip_tpu_backend() -> None:
    """No TPU chip is attached: keep JAX from loading libtpu only to find none (libtpu writes
    C++ warnings about TPU hostnames to stderr before the backend fails). JAX's own Cloud TPU
    set-up draws the same conclusion from the same PCI check. Compiling for a TPU target without
    one (`jaxserve compile`) loads libtpu through a topology, not this backend, and still works."""
    with contextlib.suppress(ImportError, AttributeError, TypeError, ValueError):
        from jax._src import xla_bridge  # NOTE: private; the public way is JAX_PLATFORMS

        registration = xla_bridge._backend_factories.get("tpu")
        if registration is not None and registration.fail_quietly and not xla_bridge._backends:
            # Kept registered (TPU lowering rules need the platform known); fails at once.
            xla_bridge._backend_factories["tpu"] = dataclasses.replace(registration,
                                                                       factory=_no_tpu)


def _no_tpu():
    raise RuntimeError("no TPU chip is attached")


def _import_cuda_plugins_silently() -> None:
    """The CUDA plugin logs through C++ (absl) as it is imported, before any Python logging
    applies: import it here with file descriptor 2 pointed at /dev/null, so that JAX's own import
    later finds it loaded. A failing import is left for JAX to report."""
    try:
        import jax_plugins
    except ImportError:
        return
    names = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__, "jax_plugins.")
             if "cuda" in m.name]
    if not names:
        return
    with _stderr_to_devnull():
        for name in names:
            with contextlib.suppress(Exception):
                importlib.import_module(name)


@contextlib.contextmanager
def _stderr_to_devnull():
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
