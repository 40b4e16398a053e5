"""Debugging VM exits: hooks, stepper, trace, statistics."""
