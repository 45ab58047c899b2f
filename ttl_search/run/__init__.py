"""Running a study on Ray Tune: the worker-side trainable and Ray set-up (``cluster``), the
driver-side searcher (``searcher``), and create/resume (``driver``). Only the CLI imports this."""
