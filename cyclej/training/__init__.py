"""The LoRA trainer and what it shares with RL: schedule, precision, optimizer, OOM, diagnostics."""
