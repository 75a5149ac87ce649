"""Compiled step executables kept on disk, so a warm start skips tracing as well as compiling.

JAX's persistent compilation cache is keyed by the lowered program, so finding an entry still means
tracing the model for every bucket (seconds at start-up). This cache is keyed instead by everything
the program is derived from: jaxserve's own source, the jax/jaxlib versions, the devices, XLA_FLAGS,
the model config, the dtypes and every shape the engine fixes at start-up. Any of those changing
gives a new key, and the buckets are traced and compiled as usual (and stored under the new key).

Set `JAXSERVE_EXECUTABLE_CACHE=0` to turn it off. Entries are pickles of what
`jax.experimental.serialize_executable` produces, with the ids of the devices the executable runs
on; like JAX's own cache, the folder must be trusted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
from typing import Any

import jax

logger = logging.getLogger(__name__)

# What the compiled step is built from: the model code, the kernels, the engine (runner, sampler),
# the mask application of structured outputs, and the top-level modules (config, sampling params).
_SOURCE_DIRS = ("models", "kernels_pallas", "sharding", "jaxserve/engine",
                "jaxserve/structured_output")


@functools.cache
def source_fingerprint() -> str:
    """A hash of the installed source files the compiled step depends on (Python and C++)."""
    import jaxserve

    root = os.path.dirname(os.path.dirname(os.path.abspath(jaxserve.__file__)))
    paths = [os.path.join(root, "jaxserve", n) for n in os.listdir(os.path.join(root, "jaxserve"))
             if n.endswith(".py")]
    for top in _SOURCE_DIRS:
        for folder, _, files in os.walk(os.path.join(root, top)):
            paths += [os.path.join(folder, n) for n in files if n.endswith((".py", ".cc", ".h"))]
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


@contextlib.contextmanager
def fresh_compiles():
    """Compile without JAX's caches for the duration.

    An XLA:CPU executable that JAX took from its persistent cache (or from its in-memory cache,
    having loaded it from disk earlier in the process) serialises into a blob without its kernels:
    loaded again, it fails with "Function ... not found". What we store must come from a real
    compile, so the persistent cache is switched off (and reset, since JAX decides whether to use
    it once per process) and the in-memory caches are cleared; both come back afterwards.
    """
    from jax._src import compilation_cache

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    jax.clear_caches()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()


def enabled() -> bool:
    """On unless JAXSERVE_EXECUTABLE_CACHE=0, and off in a multi-host group: its executables
    span processes, and each process would read what another (with other local devices)
    compiled and stored under the same key."""
    return (os.environ.get("JAXSERVE_EXECUTABLE_CACHE", "1").lower() not in ("0", "false", "no")
            and jax.process_count() == 1)


# Key folders kept under the cache's root: older ones (stale source, other shapes) are removed
# when a new one is written, least recently used first.
MAX_KEYS = int(os.environ.get("JAXSERVE_EXECUTABLE_CACHE_KEYS", "16"))


class ExecutableCache:
    """`load(name)` / `store(name, compiled)` under `root/<key>`, the key derived from `parts`."""

    def __init__(self, root: str, parts: dict[str, Any]):
        import jaxlib

        devices = jax.devices()
        ident = {
            "source": source_fingerprint(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "devices": [(d.platform, d.device_kind) for d in devices],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "x64": jax.config.jax_enable_x64,
            "matmul_precision": str(jax.config.jax_default_matmul_precision),
            **parts,
        }
        self.key = hashlib.sha256(repr(sorted(ident.items())).encode()).hexdigest()[:24]
        self.root = root
        self.folder = os.path.join(root, self.key)

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, f"{name}.pkl")

    def load(self, name: str):
        """The executable stored under `name`, or None (absent, or unreadable: then it is
        dropped and compiled again)."""
        from jax.experimental.serialize_executable import deserialize_and_load

        path = self._path(name)
        if not os.path.exists(path):
            return None
        with contextlib.suppress(OSError):
            os.utime(self.folder)  # recently used: pruned last
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree, device_ids = pickle.load(f)
            # NOTE: without its devices, an executable loads onto all of the backend's: a
            # one-device step then wants a shard per device, and a mesh's aborts the process.
            by_id = {d.id: d for d in jax.devices()}
            return deserialize_and_load(payload, in_tree, out_tree,
                                        execution_devices=[by_id[i] for i in device_ids])
        except Exception as e:  # noqa: BLE001 (a stale or torn entry must never stop start-up)
            logger.warning("ignoring cached executable %s: %s: %s", path, type(e).__name__, e)
            try:
                os.remove(path)
            except OSError:
                pass
            return None

    def store(self, name: str, compiled) -> None:
        from jax.experimental.serialize_executable import serialize

        path = self._path(name)
        try:
            devices = compiled.runtime_executable().local_devices()  # in assignment order
            data = pickle.dumps((*serialize(compiled), [d.id for d in devices]))
            if not os.path.isdir(self.folder):
                os.makedirs(self.folder, exist_ok=True)
                self.prune()
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: a concurrent start-up never reads half a file
        except Exception as e:  # noqa: BLE001 (caching is an optimisation; serving goes on)
            logger.warning("could not cache executable %s: %s: %s", name, type(e).__name__, e)

    def prune(self, keep: int | None = None) -> None:
        """Remove all but the `keep` (MAX_KEYS) most recently used key folders."""
        import shutil

        keep = MAX_KEYS if keep is None else keep
        try:
            folders = [e for e in os.scandir(self.root) if e.is_dir()]
        except OSError:
            return
        folders.sort(key=lambda e: e.stat().st_mtime, reverse=True)
        for entry in folders[keep:]:
            if entry.path != self.folder:
                logger.info("removing old cached executables %s", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)
