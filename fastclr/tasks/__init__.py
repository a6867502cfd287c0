"""The commands: ``fastclr pretrain`` and, after it, ``fastclr eval | linear | finetune | distill | export`` (one
module each), and what they share (:mod:`.common`). The training ones run on :class:`fastclr.trainer.Trainer` with
their stage (:mod:`fastclr.stages`)."""
COMMANDS = {
    "eval": "kNN monitor and quick probe of a checkpoint or exported backbone",
    "linear": "the standard linear evaluation protocol (frozen backbone, top-1/top-5)",
    "finetune": "SimCLR v2 fine-tuning from the head's first layer on 1%/10%/listed labels",
    "distill": "SimCLR v2 distillation of a fine-tuned teacher into a student",
    "export": "backbone (and head) as state_dict and safetensors, from any checkpoint",
}
"""Command name → one-line help (``fastclr --help``); each lives in ``fastclr.tasks.<name>``."""
