"""Dev and demo tooling: not used by the production pipeline."""
