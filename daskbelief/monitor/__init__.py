"""Seeing what a run does: ``events`` (the event schema and the driver's ``EventLog``), ``shaping``
(events -> plot data), ``dashboard`` (the Dask dashboard page), ``live`` (the Jupyter plot),
``report`` (PNG reports of run directories) and ``progress`` (the driver's progress bar)."""
