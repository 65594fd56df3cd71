"""Iceberg table maintenance: compaction of closed partitions, snapshot expiry, orphan file removal."""

from k2_assets.defs.maintenance.jobs import table_maintenance_job
from k2_assets.defs.maintenance.schedules import table_maintenance_schedule

assets = []
jobs = [table_maintenance_job]
schedules = [table_maintenance_schedule]
sensors = []
resources = {}
