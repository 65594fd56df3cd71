"""The Dagster code location: every asset, check, job, schedule, sensor and resource found under `k2_assets.defs`."""

import dagster as dg

from k2_assets.core.settings import apply_defaults

apply_defaults()  # before any EnvVar is read: embedded defaults for one machine

import k2_assets.defs  # noqa: E402 - after apply_defaults(): the EnvVar defaults must be set before the defs load

# The defs folder is loaded whole, so a module added under it cannot be left out by accident.
defs = dg.components.load_defs(k2_assets.defs)
