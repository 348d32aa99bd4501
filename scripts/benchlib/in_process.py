"""The baseline without serving: the whole GGUF in one ``StageRuntime`` in this process, timed per token."""

from __future__ import annotations

import pathlib
import time

import numpy as np

from benchlib.client import StreamResult


class InProcess:
    """The whole GGUF in one ``StageRuntime`` (llama-cpp-python's low-level API), greedy, one request at a time."""

    def __init__(self, gguf: pathlib.Path, threads: int) -> None:
        from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime  # noqa: PLC0415
        from chatloop.engine.tokenizer import Tokenizer  # noqa: PLC0415

        # The same context settings as a served stage (config defaults, kv_cache_mb as ChatLoopCluster sets it).
        self.rt = StageRuntime(
            gguf, StageRole(first=True, last=True), RuntimeOptions(n_threads=threads, kv_cache_mb=256)
        )
        self.tok = Tokenizer(gguf)
        self._seq = 0
        self.decode_cpu_ms = float("nan")  # the latest request's CPU ms (all threads) per token after the first

    def generate(self, prompt: list[int], max_tokens: int) -> StreamResult:
        """Prefill then greedy decode; one "chunk" time per generated token, stopping at end-of-generation."""
        from chatloop.protocol.messages import SeqStep  # noqa: PLC0415
        from chatloop.protocol.sampling import SamplingParams  # noqa: PLC0415

        self._seq += 1
        seq = self._seq
        rt = self.rt
        res = StreamResult(sent=time.perf_counter())
        params = SamplingParams(temperature=0.0)
        out = rt.run(rt.forward, [SeqStep(seq, 0, len(prompt), sample=True, sampling=params)],
                     np.asarray(prompt, np.int32))  # fmt: skip
        pos = len(prompt)
        generated = []
        cpu0 = time.process_time()  # NOTE: this process's every thread; the client side is idle meanwhile
        while True:
            token = out[0].token
            if self.tok.is_eog(token):
                res.finish_reason = "stop"
                break
            generated.append(token)
            res.chunk_times.append(time.perf_counter())
            if len(generated) >= max_tokens:
                res.finish_reason = "length"
                break
            out = rt.run(rt.forward, [SeqStep(seq, pos, 1, sample=True)], np.asarray([token], np.int32))
            pos += 1
        self.decode_cpu_ms = 1000 * (time.process_time() - cpu0) / max(len(generated) - 1, 1)
        rt.run(rt.release, seq)
        res.tokens = len(generated)
        res.prompt_tokens = len(prompt)
        res.text = self.tok.detokenize(generated)
        return res

    def close(self) -> None:
        self.rt.close()
        self.tok.close()
