"""Measurement of a finished federation: quality, disclosure attacks, cost, reports, sweeps."""
