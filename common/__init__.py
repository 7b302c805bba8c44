"""Code shared by the API-node side and the worker that belongs to neither: the Kafka client
factory (``kafka_clients``), the topic follower (``follower``) and the retry helper
(``retry``). Imports nothing of ours but ``schemas`` (and itself), so ``node`` may import it."""
