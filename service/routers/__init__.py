"""The API's routes, one router per resource: jobs, models, and health (probes and metrics)."""
