"""Running a node for real: first files (init), DNS records, backup and restore, upgrades, and
the service manager (systemd readiness, watchdog, reload)."""
