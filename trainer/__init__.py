"""VinePPO-Lite / full VinePPO on EasyDeL's GRPO trainer: filled by the trainer issue (#5)."""
