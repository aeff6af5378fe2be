"""The long-running service: `run` in one process (scheduler) or as distributed workers."""
