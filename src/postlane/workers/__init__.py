"""SMTP intake in worker processes (``[node] workers`` > 1): ``pool.py`` is the main process's
side (it binds, starts and feeds the workers, and commits what they accept), ``process.py`` a
worker (the edge, intake checks and feedback reception of its own). A part of its own above
edge, policy and feedback, beside the node that starts it."""
