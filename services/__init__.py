"""streamrec services: the consumer runtime, the services built on it, and their learners."""
