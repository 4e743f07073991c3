"""One run: specs -> parts (build.py) -> Lightning fit (runner.py, module.py) -> record, plus the
test-time pass (serve.py) and the probe's tables (probe_tables.py)."""
