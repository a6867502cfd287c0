"""SimCLR pretraining from a checkout: the same command as ``fastclr pretrain`` (see fastclr/tasks/pretrain.py).

    deepspeed launchers/pretrain.py                         # embedded default dataset, whatever this machine has
    deepspeed --num_gpus 8 launchers/pretrain.py --config launchers/configs/imagenet_resnet50_bs4096.yaml \
        "data.path=/data/imagenet/train-{000000..001023}.tar" data.eval_path=/data/imagenet/val
    python launchers/pretrain.py --config cifar10_resnet18 train.epochs=200 data.path=/data/cifar/train ...

Wiring only: the library parses the recipe and overrides, trains, and returns the exit status.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fastclr first

from fastclr.tasks.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
