"""`jaxserve` imports from a source checkout: the top-level `models/`, `sharding/` and
`kernels_pallas/` folders are `jaxserve.models`, `.sharding` and `.kernels_pallas`."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_IMPORTS = ("from jaxserve import LLM, SamplingParams; import jaxserve.models.loader, "
            "jaxserve.sharding, jaxserve.kernels_pallas; print(jaxserve.models.__file__)")
# Without the editable install's finder, as with a wheel installed in site-packages (or a
# `compat`-mode editable install): only the working directory finds `jaxserve`.
_NO_EDITABLE_FINDER = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                       "if '__editable__' not in getattr(f, '__module__', '')]; ")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_import_llm_from_the_repo_root():
    out = _run(_IMPORTS)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == os.path.join(REPO, "models", "__init__.py")


def test_import_from_the_repo_root_without_the_editable_finder():
    out = _run(_NO_EDITABLE_FINDER + _IMPORTS)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == os.path.join(REPO, "models", "__init__.py")
