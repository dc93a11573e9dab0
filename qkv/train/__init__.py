"""Training: built-in seq2seq tasks and text, the loop, checkpoints that survive faults, torch.distributed.

    from qkv.train import TrainConfig, train
    train(TrainConfig(task="reverse", out="runs/reverse", max_steps=1500))

``qkv train`` is the command-line face of the same function; under ``torchrun`` it trains with DDP
(or FSDP2). ``qkv.load(run_dir)`` loads the newest valid checkpoint back.
"""

from .config import TrainConfig
from .trainer import Trainer, TrainingError, train

__all__ = ["TrainConfig", "Trainer", "TrainingError", "train"]
