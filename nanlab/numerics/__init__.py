"""What changes the numbers: attention softmax variants (attention.py), precision plugins
(precision.py), guards (guards.py) and the failure mechanisms (stress.py). They know nothing
of monitoring."""
