"""fastlm: a lean language-model trainer whose hot ops are the fused kernels of :mod:`kernels`.

Modules: :mod:`~fastlm.config` (typed config and presets), :mod:`~fastlm.model`
(the decoder LM, the encoder classifier, the encoder-decoder), :mod:`~fastlm.tokenizer`
and :mod:`~fastlm.data` (corpus, BPE, token cache, batches), :mod:`~fastlm.taskdata`
(labelled examples: files and the built-in data sets), :mod:`~fastlm.tasks` (what the
loop trains: data, model, batches, evaluation per task), :mod:`~fastlm.train` (the
loop), :mod:`~fastlm.rundir` (run and export directories: marker, lock, overwrite),
:mod:`~fastlm.files` (atomic writes), :mod:`~fastlm.checkpoint`, :mod:`~fastlm.metrics`,
:mod:`~fastlm.generate` (sampling, greedy and beam decoding, label prediction), :mod:`~fastlm.hf` (Hugging
Face checkpoints in and out) and :mod:`~fastlm.cli`.
"""

from .config import Config, ModelConfig, TrainConfig, preset

__all__ = ["Config", "ModelConfig", "TrainConfig", "preset", "GPT"]


def __getattr__(name: str):
    # The model (and with it torch) loads on first use, so the command line can set up the
    # process (OpenMP's wait policy, fastlm.cli) before torch starts.
    if name == "GPT":
        from .model import GPT

        return GPT
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")
