"""The task queue: a stage op waiting for a queue agent's task, and the external worker (``agent serve``)."""
