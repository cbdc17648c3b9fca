"""Runs `dgemma.train.loop.train` in a child process for tests/test_train.py's kill test.

Usage: python train_driver.py CONFIG.json [SAVE_DELAY_SECONDS]. Each safetensors file written by a save is
followed by a pause, so that the test can kill the process while a checkpoint is being written.
"""

import json
import sys
import time

import torch

torch.set_num_threads(1)

import dgemma.model.loading as loading  # noqa: E402
import dgemma.train.checkpoint as checkpoint  # noqa: E402
from dgemma.config import TrainConfig  # noqa: E402
from dgemma.train.loop import train  # noqa: E402

delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0


def _slow(save):
    def slow_save(*args, **kwargs):
        save(*args, **kwargs)
        time.sleep(delay)

    return slow_save


loading.save_file = _slow(loading.save_file)
checkpoint.save_file = _slow(checkpoint.save_file)
train(TrainConfig.from_dict(json.loads(open(sys.argv[1]).read())))
