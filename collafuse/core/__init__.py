"""The maths and the wire: schedule, sampling, models, protocol, role state. Knows nothing above it."""
