#!/usr/bin/env bash
# README's "Run it", as a newcomer runs it: a fresh virtualenv, an empty HOME, the install command
# and the examples copied out of README.md (so the check follows README), then:
#   - torch must not be importable in that venv (serving must not need it),
#   - `jaxserve serve` must answer /health, and README's curl request, `jaxserve chat -q` line and
#     Python client example each with a non-empty reply,
#   - SIGTERM must stop it with exit code 0 and a log without any ERROR line or Traceback.
#
#   scripts/check_readme_run.sh            # exit 0 when all of that holds
#
# Environment: PYTHON (default python3) makes the venv; HEALTH_TIMEOUT (seconds, default 1200)
# bounds the cold start (an empty HOME has no compile cache: every bucket compiles);
# KEEP_TMP=1 keeps the temp folder (venv, HOME, server log). pip keeps its own configuration
# (/etc/pip.conf, PIP_* variables) and, through PIP_CACHE_DIR, the caller's download cache.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-1200}
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$("$PYTHON" -m pip cache dir 2>/dev/null || echo "$HOME/.cache/pip")}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/jaxserve-readme.XXXXXX")
SERVER_PID=
START=$SECONDS

say() { printf '[check_readme_run %4ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() { say "FAIL: $*"; [[ -f $TMP/server.log ]] && { say "server log (last 60 lines):"; tail -n 60 "$TMP/server.log"; }; exit 1; }
cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID" 2>/dev/null || true; fi
    if [[ ${KEEP_TMP:-0} == 1 ]]; then say "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

# ----- README's commands ----------------------------------------------------------------------
# The install is the one-command line with its final `&& jaxserve serve` taken off; the request is
# the curl command of the "Run it" section (up to the line where it ends: no trailing backslash,
# no quote left open).
RUN_IT=$(awk '/^## Run it/{on=1; next} /^## /{on=0} on' "$REPO/README.md")
SERVE_LINE=$(grep -m1 -E '^pip install .*&& jaxserve serve$' <<<"$RUN_IT") ||
    fail "README's Run it section has no 'pip install ... && jaxserve serve' line"
INSTALL=${SERVE_LINE% && jaxserve serve}
CURL=$(awk '/^curl /{on=1} on{print; q += gsub(/\047/, "\047"); if (q % 2 == 0 && $0 !~ /\\$/) exit}' <<<"$RUN_IT")
[[ -n $CURL ]] || fail "README's Run it section has no curl command"
# Then the one-question `jaxserve chat -q` line and the first Python block (the OpenAI client).
CHAT=$(grep -m1 -E '^jaxserve chat -q ' <<<"$RUN_IT" | sed -E 's/ +#.*$//') ||
    fail "README's Run it section has no 'jaxserve chat -q' line"
CLIENT_PY=$(awk '/^```python/{on=1; next} on && /^```/{exit} on' <<<"$RUN_IT")
[[ $CLIENT_PY == *localhost:8000* ]] || fail "README's first Python block is not the client example"
say "install: $INSTALL"

# ----- a fresh venv, an empty HOME --------------------------------------------------------------
mkdir -p "$TMP/home"
"$PYTHON" -m venv "$TMP/venv"
export HOME=$TMP/home VIRTUAL_ENV=$TMP/venv PATH=$TMP/venv/bin:$PATH
unset PYTHONPATH XDG_CACHE_HOME HF_HOME HF_HUB_CACHE JAXSERVE_COMPILATION_CACHE_DIR PYTHONHOME
export NO_PROXY=localhost,127.0.0.1${NO_PROXY:+,$NO_PROXY} no_proxy=localhost,127.0.0.1${no_proxy:+,$no_proxy}
(cd "$REPO" && eval "$INSTALL") >"$TMP/install.log" 2>&1 || { tail -n 40 "$TMP/install.log"; fail "install failed"; }
say "installed: $(python -c 'import jax, jaxserve; print("jaxserve", jaxserve.__version__, "jax", jax.__version__)')"
if python -c 'import torch' 2>/dev/null; then fail "torch is importable in the fresh venv"; fi
say "torch is not importable: good"

# ----- serve, ask, stop ---------------------------------------------------------------------------
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CURL=${CURL//localhost:8000/localhost:$PORT}
(cd "$REPO" && exec jaxserve serve --port "$PORT") >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
say "jaxserve serve --port $PORT (pid $SERVER_PID); waiting up to ${HEALTH_TIMEOUT}s for /health"
until curl -sf -o /dev/null "http://localhost:$PORT/health"; do
    kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited before answering /health"
    ((SECONDS - START < HEALTH_TIMEOUT)) || fail "no /health answer in ${HEALTH_TIMEOUT}s"
    sleep 2
done
say "healthy"
REPLY_JSON=$(eval "$CURL -sS --max-time 300") || fail "the curl request failed"
ANSWER=$(python -c 'import json, sys; print(json.loads(sys.argv[1])["choices"][0]["message"]["content"])' "$REPLY_JSON") ||
    fail "not a chat completion: $REPLY_JSON"
[[ -n ${ANSWER//[[:space:]]/} ]] || fail "empty answer: $REPLY_JSON"
say "answer: $ANSWER"
CHAT_OUT=$(eval "timeout 300 $CHAT --url http://localhost:$PORT/v1" </dev/null) || fail "$CHAT failed"
[[ -n ${CHAT_OUT//[[:space:]]/} ]] || fail "$CHAT printed nothing"
say "jaxserve chat -q: $CHAT_OUT"
PY_OUT=$(timeout 300 python -c "${CLIENT_PY//localhost:8000/localhost:$PORT}") || fail "README's Python client example failed"
[[ -n ${PY_OUT//[[:space:]]/} ]] || fail "README's Python client example printed nothing"
say "python client: $PY_OUT"

kill -TERM "$SERVER_PID"
(sleep 60 && kill -KILL "$SERVER_PID") 2>/dev/null &
WATCHDOG=$!
CODE=0; wait "$SERVER_PID" || CODE=$?
SERVER_PID=
kill "$WATCHDOG" 2>/dev/null || true
((CODE != 137)) || fail "the server still ran 60s after SIGTERM (killed)"
((CODE == 0)) || fail "the server exited with $CODE after SIGTERM"
if grep -nE '\bERROR\b|Traceback' "$TMP/server.log"; then fail "the server log has ERROR or Traceback lines (above)"; fi
say "OK: stopped with exit code 0, a clean log, $((SECONDS - START))s in all"
