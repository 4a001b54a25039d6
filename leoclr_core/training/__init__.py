"""Training without Ray: one step and one epoch (`engine`), checkpoints (`checkpoint`), and the in-process
pretrain job (`pretrain`)."""
