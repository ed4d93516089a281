"""Ticket work: threading, lifecycle, the pipeline that applies them, the writer, the scheduler, stats."""
