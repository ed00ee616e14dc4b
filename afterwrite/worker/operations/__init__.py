"""What operators run and read: status, health, metrics, usage statistics, retention,
export/import and dead-letter administration."""
