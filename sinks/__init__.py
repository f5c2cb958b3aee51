"""Where results go: Kafka output topics, dead letters, Redis."""
