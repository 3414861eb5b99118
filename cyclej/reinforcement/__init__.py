"""RL on cycle consistency: the policy-gradient trainer, FSDP2, rewards, the discriminator."""
