"""Fine-tuning tools that run beside training: the learning-rate range test (``lr_find``).

Starting from pretrained weights, adapting them, freezing parts and per-part learning rates are options of
every training run (``TrainConfig.weights``, ``freeze``, ``finetune``, ``layer_decay``; ``reslab.models.pretrained``).
"""
