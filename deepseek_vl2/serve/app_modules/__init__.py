"""Compatibility home of the official package's demo helpers (`utils`)."""
