"""Multi-host serving on localhost: two processes of one CPU device each, joined by
jax.distributed into one tensor-parallel mesh, give the same greedy tokens as one process,
through `LLM` and through `jaxserve serve`; the follower exits 0 when node 0 stops, and is
aborted when node 0 dies."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import numpy as np
import pytest

from server_utils import (REPO, SERVED_NAME, SERVER_ENGINE, ServerProcess, free_port, serve_argv,
                          stop_process)
from tiny_models import random_prompts

pytest_plugins = ["server_utils"]

# Shapes that compile in seconds; three token buckets, all compiled at start-up on every node.
ENGINE = dict(max_model_len=96, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, seed=0,
              compile_sizes=(8, 32))
# 8 query heads over 2 KV heads: they split over the group's two devices.
DENSE = dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=130)
PROMPTS = random_prompts(5, [3, 17, 9, 30])
NEW_TOKENS = 10
TIMEOUT = 120  # seconds for a node to finish

# One process of a test: node 0 (or a single process) runs an LLM and prints its greedy tokens
# and texts; the other nodes follow node 0.
NODE = textwrap.dedent("""
    import json, logging, sys, time
    from jaxserve import LLM, SamplingParams
    from jaxserve.engine.args import EngineArgs
    from jaxserve.engine.distributed import run_follower

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s] %(message)s")
    kwargs, prompts, max_tokens = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    if kwargs.get("node_rank", 0) > 0:
        sys.exit(run_follower(EngineArgs(**kwargs)))
    llm = LLM(**kwargs)
    if max_tokens == 0:  # wait to be killed
        print("READY", flush=True)
        time.sleep(600)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts],
                        params, use_tqdm=False)
    print("RESULT " + json.dumps([[o.outputs[0].token_ids, o.outputs[0].text] for o in outs]),
          flush=True)
""")


def _env(devices: int = 1) -> dict[str, str]:
    """This environment with `devices` CPU devices per process (conftest asks for 8)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())


def _group() -> dict:
    """Two nodes on loopback, a tensor-parallel mesh over their two devices."""
    return dict(nnodes=2, master_addr="127.0.0.1", master_port=free_port(),
                tensor_parallel_size=2)


class Node:
    """`NODE` in a subprocess with one CPU device; its output goes to `log_path`."""

    def __init__(self, kwargs: dict, prompts: list, max_tokens: int, log_path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        argv = [sys.executable, "-c", NODE, json.dumps(kwargs), json.dumps(prompts),
                str(max_tokens)]
        self.proc = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def result(self) -> list:
        """[[token ids, text] per prompt] that node 0 printed."""
        found = re.search(r"^RESULT (.*)$", self.output(), re.M)
        assert found, self.output()[-3000:]
        return json.loads(found.group(1))

    def stop(self) -> int:
        return stop_process(self.proc, self._log, timeout=5)


def _wait(*nodes: Node) -> None:
    """Wait for every node to exit 0; one still running after TIMEOUT fails the test."""
    deadline = time.monotonic() + TIMEOUT
    try:
        for node in nodes:
            try:
                code = node.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{node.log_path} did not exit in {TIMEOUT} s:\n"
                            f"{node.output()[-3000:]}")
            assert code == 0, f"{node.log_path} exited with {code}:\n{node.output()[-3000:]}"
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def dense_folder(tiny_model_dir) -> str:
    return tiny_model_dir("LlamaForCausalLM", **DENSE)[0]


def test_two_nodes_give_the_tokens_of_one_process(dense_folder, tmp_path):
    one = Node(dict(model=dense_folder, **ENGINE), PROMPTS, NEW_TOKENS, tmp_path / "one.log")
    group = dict(model=dense_folder, **_group(), **ENGINE)
    nodes = [Node({**group, "node_rank": rank}, PROMPTS, NEW_TOKENS, tmp_path / f"node{rank}.log")
             for rank in range(2)]
    _wait(one, *nodes)
    assert nodes[0].result() == one.result()
    # Both nodes compiled every bucket at start-up; node 1 ran node 0's steps until it stopped.
    out0, out1 = nodes[0].output(), nodes[1].output()
    assert "device mesh {'data': 1, 'pipe': 1, 'model': 2}" in out0
    for out in (out0, out1):
        assert "compiled 3 token buckets [8, 32, 64]" in out
    assert re.search(r"node 0 stopped after [1-9]\d* steps: node 1 exits", out1), out1[-2000:]


def test_follower_is_aborted_when_node_0_dies(dense_folder, tmp_path):
    group = dict(model=dense_folder, **_group(), **ENGINE, enforce_eager=True)  # no compiling
    node0, node1 = [Node({**group, "node_rank": rank}, PROMPTS, 0, tmp_path / f"node{rank}.log")
                    for rank in range(2)]
    try:
        deadline = time.monotonic() + TIMEOUT
        while "READY" not in node0.output():
            assert node0.proc.poll() is None and time.monotonic() < deadline, \
                node0.output()[-3000:]
            time.sleep(0.2)
        node0.proc.send_signal(signal.SIGKILL)
        code = node1.proc.wait(timeout=30)
    finally:
        node0.stop()
        node1.stop()
    assert code != 0
    assert "JAX distributed service detected fatal errors" in node1.output()


def test_serve_on_two_nodes_answers_as_one_process_and_stops_on_sigterm(server_model_dir,
                                                                        tmp_path):
    prompt, sizes = "The capital of France is", [8, 32]  # the same compile buckets in both
    one = Node(dict(model=server_model_dir, compile_sizes=sizes, **SERVER_ENGINE), [prompt], 8,
               tmp_path / "one.log")  # runs while the nodes start
    group = dict(served_model_name=[SERVED_NAME], cudagraph_capture_sizes=sizes, **_group(),
                 **SERVER_ENGINE)
    node0 = ServerProcess(server_model_dir, str(tmp_path / "node0.log"), env=_env(), node_rank=0,
                          **group)
    node1_log_path = tmp_path / "node1.log"
    node1_log = open(node1_log_path, "wb")
    node1 = subprocess.Popen(serve_argv(server_model_dir, node_rank=1, **group), cwd=REPO,
                             env=_env(), stdout=node1_log, stderr=subprocess.STDOUT)
    try:
        node0.wait_ready(timeout=TIMEOUT)
        response = httpx.post(node0.base_url + "/v1/completions", timeout=60, json={
            "model": SERVED_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True})
    finally:
        code0 = node0.stop()  # SIGTERM; the follower then exits by itself
        try:
            code1 = node1.wait(timeout=60)
        finally:
            stop_process(node1, node1_log, timeout=5)
    _wait(one)
    [(want_ids, want_text)] = one.result()
    with open(node1_log_path, "rb") as f:
        out1 = f.read().decode(errors="replace")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == want_text
    assert response.json()["usage"]["completion_tokens"] == len(want_ids) == 8
    assert code0 == 0, node0.log()
    assert code1 == 0, out1[-3000:]
    assert "node 0 stopped after" in out1
    serving = f"serving {SERVED_NAME} on"
    assert serving in node0.log(tail=10**6) and serving not in out1  # no HTTP on node 1


# ---- without a group ------------------------------------------------------------------------
def test_group_address_and_roles():
    from jaxserve import LLM
    from jaxserve.engine.args import EngineArgs
    from jaxserve.engine.distributed import DistributedConfig, run_follower

    assert DistributedConfig.from_args(EngineArgs()) is None
    config = DistributedConfig.from_args(EngineArgs(nnodes=4, node_rank=3, master_addr="::1",
                                                    master_port=7000,
                                                    distributed_timeout_seconds=20))
    assert config == DistributedConfig("[::1]:7000", 4, 3, 20)
    with pytest.raises(ValueError, match="node_rank=1: only node 0 runs an LLM"):
        LLM(model="unused", nnodes=2, node_rank=1)
    with pytest.raises(ValueError, match="run_follower runs nodes 1 to N-1"):
        run_follower(EngineArgs(nnodes=2, node_rank=0))


def test_step_messages_round_trip():
    from jaxserve.engine.distributed import _decode, _encode

    rng = np.random.default_rng(0)
    leaves = [rng.integers(0, 1000, 64).astype(np.int32),  # a token stream
              np.full((8, 96), -1, np.int32),  # a constant table: sent as its value
              np.full(300, np.nan, np.float32),  # constant too, bit for bit
              np.where(np.arange(300) % 2, 0.0, -0.0).astype(np.float32),  # not constant
              rng.random((8, 20)).astype(np.float32), np.zeros((8, 0), np.int32),
              np.asarray(True), np.arange(5, dtype=np.uint32)]
    message = _encode(leaves)
    assert len(message) < 8 * 96 * 4  # the constant tables are not in it
    got = _decode(message)
    assert [(x.dtype, x.shape) for x in got] == [(x.dtype, x.shape) for x in leaves]
    for x, y in zip(leaves, got):
        assert x.tobytes() == y.tobytes()  # bit for bit (signed zeros, NaNs)
