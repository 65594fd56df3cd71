"""ASX equities history from the vendor's CSV files."""
