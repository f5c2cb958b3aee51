"""The pure domain core: no Kafka, no Redis, no wall clock unless injected."""
