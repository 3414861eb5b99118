"""What the tests share: tiny models, the local Prefect server, the RunPod stand-in, scripts."""
