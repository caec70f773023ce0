"""Where a job's state lives: the job store and its Lua, the Redis key names, the Celery messages
it queues, the worker registry (heartbeats), queue position and ETA, and the webhook delivery log."""
