"""Training: losses and rewards (pure), compiled steps, checkpointing, training rows
(`examples`), the one training loop (`loop.train`) and the three stages as its `Stage`s
(`sft.run_sft`, `rft.run_rft`, `grpo.run_grpo`; `rollouts` holds what RFT and GRPO share);
`experiments/train.py` is the entry point."""
