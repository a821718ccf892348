"""The Dagster code location of perpfolio: definitions, settings, resources, partitions, schedules, run.

The project uses a few of Dagster's beta and preview APIs on purpose (partition mappings that allow
partitions before the first, backfill policies, partitioned asset checks). Their
warnings would print on every load, for every user, about a choice the user did not make, so they
are silenced here, once for every way the location is loaded (make run, the UI, the tests).
"""

import warnings

import dagster as dg

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
