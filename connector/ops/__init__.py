"""Operating it: logs, metrics, health, the status page, progress display, protocol logs."""
