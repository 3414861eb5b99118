"""The pipeline: the stage registry and DAG, running a stage (in this process or on N ranks), and
the pod sizing of `cyclej plan`."""
