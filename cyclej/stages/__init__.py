"""The stages, one file each: `run_<stage>(run: StageRun) -> ArtifactRef` (cyclej.pipeline.registry
lists them, their inputs and the config each one's fingerprint hashes)."""
