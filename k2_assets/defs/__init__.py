"""Dagster definitions, grouped by source and concern."""
