"""Periodic engine statistics in the log, as vLLM prints them."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("jaxserve.engine")


class StatLogger:
    """Counts prompt and generated tokens; every `interval` seconds logs rates and occupancy."""

    def __init__(self, interval: float = 5.0, enabled: bool = True):
        self.interval = interval
        self.enabled = enabled
        self._last = time.monotonic()
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def record(self, prompt_tokens: int, generation_tokens: int, *, running: int, waiting: int,
               kv_usage: float, prefix_hit_rate: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generation_tokens
        now = time.monotonic()
        elapsed = now - self._last
        if not self.enabled or elapsed < self.interval:
            return
        logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f "
                    "tokens/s, Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
                    "Prefix cache hit rate: %.1f%%", self.prompt_tokens / elapsed,
                    self.generation_tokens / elapsed, running, waiting, kv_usage * 100,
                    prefix_hit_rate * 100)
        self._last = now
        self.prompt_tokens = self.generation_tokens = 0
