"""The tiny federation most run tests use: a one-block, width-16 ViT pre-trained for one epoch on 40 digits
per domain, with rank-2 LoRA on two projections. Seconds per run; add the run's own overrides after it."""

TINY_VIT = [
    "model.pretrain_epochs=1",
    "model.hidden_size=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=16",
    "data.samples_per_domain=40",
    "lora.rank=2",
    "lora.alpha=4",
    "lora.target_modules=['q_proj','fc1']",
]
