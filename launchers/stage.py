"""A stage after pretraining from a checkout: the same command as ``fastclr linear | finetune | distill``.

    python launchers/stage.py finetune runs/default/checkpoints --labels 10%
    deepspeed --num_gpus 8 launchers/stage.py distill runs/in1k/finetune/classifier.pt --config distill_imagenet

Wiring only (what Slurm's tasks run for ``submit.py --task``): the library parses, trains and returns the exit status.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fastclr first

from fastclr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
