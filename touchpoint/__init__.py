"""Touchpoint: an event-streaming customer touchpoint tracker."""

__version__ = "0.1.0"
