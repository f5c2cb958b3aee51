"""Stream processors: ingest (raw topics to bundles) and the Faust worker stages."""
