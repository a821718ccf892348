"""perpfolio: mean-variance risk management of crypto perpetual futures.

The pure domain library. It imports no dagster and does no warehouse I/O: every function
takes numpy arrays or polars frames and returns them, so it is testable on its own.
"""
