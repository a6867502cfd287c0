"""The stages of SimCLR v2, each what :class:`fastclr.trainer.Trainer` needs to run it: data, network, optimizer kind,
objective, evaluation and outputs. :mod:`.pretrain`: SimCLR pretraining (NT-Xent, with or without the momentum
memory); :mod:`.supervised`: linear evaluation, fine-tuning and distillation (cross-entropy or distillation loss)."""
