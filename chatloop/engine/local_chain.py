"""Every stage of a converted model chained in one process: the reference for parity tests, the engine
benchmark and ``chatloop generate`` (a debugging aid, like llama.cpp's CLI)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import numpy as np

from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime
from chatloop.engine.tokenizer import Tokenizer
from chatloop.engine.worker_thread import WorkerThread
from chatloop.modelfiles.manifest import load_manifest
from chatloop.protocol.messages import SampledToken, SeqStep
from chatloop.protocol.sampling import SamplingParams


class LocalChain:
    def __init__(self, model_dir: str | pathlib.Path, options: RuntimeOptions | None = None) -> None:
        self.dir = pathlib.Path(model_dir)
        self.manifest = load_manifest(self.dir)
        self.stages: list[StageRuntime] = []
        # One decode thread for every stage, as in one process running the whole model (see StageRuntime).
        self._executor = WorkerThread("decode-chain")
        try:
            for s in self.manifest.stages:
                role = StageRole(first=s.has_embedding, last=s.has_head)
                self.stages.append(StageRuntime(self.dir / s.file, role, options, executor=self._executor))
            self.tokenizer = Tokenizer(self.dir / self.manifest.stages[0].file)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for st in self.stages:
            st.close()
        self.stages = []
        self._executor.shutdown(wait=True)
        if getattr(self, "tokenizer", None):
            self.tokenizer.close()

    def __enter__(self) -> LocalChain:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def forward(self, steps: list[SeqStep], tokens: np.ndarray) -> list[SampledToken]:
        data: np.ndarray | list[SampledToken] = np.asarray(tokens, dtype=np.int32)
        for st in self.stages:
            data = st.run(st.forward, steps, data)
        assert isinstance(data, list)
        return data

    def release(self, seq_id: int) -> None:
        for st in self.stages:
            st.run(st.release, seq_id)

    def generate_tokens(
        self, prompt: list[int], max_tokens: int, sampling: SamplingParams | None = None, seq_id: int = 0
    ) -> Iterator[SampledToken]:
        """Yield sampled tokens until an end-of-generation token or ``max_tokens``."""
        sampling = sampling or SamplingParams()
        try:
            step = SeqStep(seq_id, 0, len(prompt), sample=True, sampling=sampling)
            out = self.forward([step], np.array(prompt, dtype=np.int32))[0]
            pos = len(prompt)
            for i in range(max_tokens):
                yield out
                if self.tokenizer.is_eog(out.token) or i == max_tokens - 1:
                    break
                out = self.forward([SeqStep(seq_id, pos, 1, sample=True)], np.array([out.token], dtype=np.int32))[0]
                pos += 1
        finally:
            self.release(seq_id)
