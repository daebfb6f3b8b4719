"""One trial: the driver's preparation (``prepare``), the worker loop (``loop``), weight averaging (``averaging``)
and launching the trial on Ray Train (``launch``)."""
