"""Plain-Python core of K2: decoding, validation and Iceberg writing. Never imports Dagster."""
