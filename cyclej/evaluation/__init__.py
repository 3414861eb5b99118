"""Evaluation: metrics, scorers, the style judge, fluency, the report and its plots."""
