"""What both sides use to reach the outside world: object storage, the URL guard (no fetch reaches
a private address), media checks, and the one Redis connection factory with its retry policy."""
