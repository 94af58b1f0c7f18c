"""fastlm: a lean language-model trainer whose hot ops are the fused kernels of :mod:`kernels`.

Modules: :mod:`~fastlm.config` (typed config and presets), :mod:`~fastlm.model`
(the decoder LM, the encoder classifier, the encoder-decoder), :mod:`~fastlm.tokenizer`
and :mod:`~fastlm.data` (corpus, BPE, token cache, batches), :mod:`~fastlm.taskdata`
(labelled examples: files and the built-in data sets), :mod:`~fastlm.tasks` (what the
loop trains: data, model, batches, evaluation per task), :mod:`~fastlm.train` (the
loop), :mod:`~fastlm.checkpoint`, :mod:`~fastlm.metrics`, :mod:`~fastlm.generate`
(sampling, greedy and beam decoding, label prediction), :mod:`~fastlm.hf` (Hugging
Face checkpoints in and out) and :mod:`~fastlm.cli`.
"""

import os

# CPU training runs many short parallel ops. With OpenMP's default of spinning between
# them, two threads ran 3-5x slower than one whenever another process shared our 2 cores;
# with threads that sleep, two were faster than one. Read when torch loads OpenMP, so this
# only takes effect if torch is not imported yet; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import Config, ModelConfig, TrainConfig, preset
from .model import GPT

__all__ = ["Config", "ModelConfig", "TrainConfig", "preset", "GPT"]
