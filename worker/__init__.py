"""The worker layer: Celery tasks that turn a stored job into an engine run (imports dfq/, never app/)."""
