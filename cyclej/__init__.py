"""CYCLE_J: a CycleGAN for text. The library: plain Python, no Prefect import."""

__version__ = "0.1.0"
