"""Compiled step executables kept on disk, so a warm start skips tracing as well as compiling.

JAX's persistent compilation cache is keyed by the lowered program, so finding an entry still means
tracing the model for every bucket (seconds at start-up). This cache is keyed instead by what the
program is derived from: a folder per jaxserve source, device kind, XLA_FLAGS, model config,
dtypes and mesh; in it, one file per executable named by the shapes of its own inputs. A flag
that changes some buckets' shapes (`--max-num-seqs` changes the rows of the larger buckets) leaves
the other executables where the next start finds them.

Each entry is stamped with the versions of jax, jaxlib and the compiler plugins that built it. An
entry built by other versions is refused with a message, and that executable is compiled again
(and stored over it): never loaded, never a crash. `jaxserve compile --target` writes entries for
a TPU slice or GPU this machine does not have; `jaxserve serve` on that hardware, with the same
jaxserve and jax, finds them here (see README, "Check that a model fits before renting").

Set `JAXSERVE_EXECUTABLE_CACHE=0` to turn it off. Entries are pickles of what
`jax.experimental.serialize_executable` produces, with the ids of the devices the executable runs
on; like JAX's own cache, the folder must be trusted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
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


def versions() -> dict[str, str | None]:
    """What built an executable: jax, jaxlib and the compiler plugins."""
    import jaxlib

    from jaxserve.engine.targets import plugin_versions

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, **plugin_versions()}


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:24]


class ExecutableCache:
    """`load(name, shapes)` / `store(name, shapes, compiled)` under `root/<key>`, the key derived
    from `parts` and the devices, each entry's file from its name and input shapes."""

    def __init__(self, root: str, parts: dict[str, Any], devices: list | None = None):
        devices = list(devices or jax.devices())
        ident = {
            "source": source_fingerprint(),
            "devices": [(d.platform, d.device_kind) for d in devices],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "x64": jax.config.jax_enable_x64,
            "matmul_precision": str(jax.config.jax_default_matmul_precision),
            **parts,
        }
        self.key = _digest(sorted(ident.items()))
        self.root = root
        self.folder = os.path.join(root, self.key)
        self.devices = devices
        self.stamp = versions()

    def _path(self, name: str, shapes: Any, ext: str = "pkl") -> str:
        return os.path.join(self.folder, f"{name}-{_digest(shapes)}.{ext}")

    def load(self, name: str, shapes: Any):
        """The executable stored under `name` for these input shapes, or None (absent, built by
        other versions, or unreadable: then it is compiled again)."""
        from jax.experimental.serialize_executable import deserialize_and_load

        path = self._path(name, shapes)
        if not os.path.exists(path):
            return None
        with contextlib.suppress(OSError):
            os.utime(self.folder)  # recently used: pruned last
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f)
            if not isinstance(entry, dict) or entry.get("stamp") != self.stamp:
                built = entry.get("stamp") if isinstance(entry, dict) else "an older jaxserve"
                logger.warning("not loading cached executable %s: it was built by %s, this is "
                               "%s; compiling it again", path, built, self.stamp)
                return None
            # NOTE: without its devices, an executable loads onto all of the backend's: a
            # one-device step then wants a shard per device, and a mesh's aborts the process.
            by_id = {d.id: d for d in self.devices}
            return deserialize_and_load(entry["payload"], entry["in_tree"], entry["out_tree"],
                                        execution_devices=[by_id[i] for i in entry["devices"]])
        except Exception as e:  # noqa: BLE001 (a stale or torn entry must never stop start-up)
            logger.warning("ignoring cached executable %s: %s: %s", path, type(e).__name__, e)
            with contextlib.suppress(OSError):
                os.remove(path)
            return None

    def store(self, name: str, shapes: Any, compiled) -> None:
        from jax.experimental.serialize_executable import serialize

        try:
            try:  # the devices in assignment order
                devices = [d.id for d in compiled.runtime_executable().local_devices()]
            except Exception:  # noqa: BLE001 (compiled for a target: no runtime devices)
                devices = [d.id for d in self.devices]
            payload, in_tree, out_tree = serialize(compiled)
            self._write(self._path(name, shapes), pickle.dumps(
                {"stamp": self.stamp, "payload": payload, "in_tree": in_tree,
                 "out_tree": out_tree, "devices": devices}))
        except Exception as e:  # noqa: BLE001 (caching is an optimisation; serving goes on)
            logger.warning("could not cache executable %s: %s: %s", name, type(e).__name__, e)

    def load_note(self, name: str, shapes: Any) -> Any:
        """A small JSON value stored with the executables (the step's measured memory, the KV
        pages they were compiled for), if stored by these versions."""
        try:
            with open(self._path(name, shapes, "json")) as f:
                entry = json.load(f)
            return entry["value"] if entry.get("stamp") == self.stamp else None
        except (OSError, ValueError, KeyError):
            return None

    def store_note(self, name: str, shapes: Any, value: Any) -> None:
        try:
            self._write(self._path(name, shapes, "json"),
                        json.dumps({"stamp": self.stamp, "value": value}).encode())
        except OSError as e:
            logger.warning("could not cache %s: %s", name, e)

    def _write(self, path: str, data: bytes) -> None:
        if not os.path.isdir(self.folder):
            os.makedirs(self.folder, exist_ok=True)
            self.prune()
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a concurrent start-up never reads half a file

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
