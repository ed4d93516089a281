"""Operating the daemon: logs, metrics and health, systemd, worker processes, the background loops."""
