"""Orchestration over a transport: the round engine, in-process transport, FedAvg baseline, Flower glue."""
