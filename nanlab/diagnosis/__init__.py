"""Watching a run: the step judgement (judge.py), the Lightning callback (monitor.py), deferred
checks, locating the first non-finite module (locate.py), causes, attention statistics and the
divergence watch. Reads the numerics room, never the other way."""
