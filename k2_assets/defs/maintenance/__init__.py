"""Iceberg table maintenance: compaction of closed partitions, snapshot expiry, orphan file removal."""
