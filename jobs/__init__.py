"""Ray job entry points: `ray job submit -- python -m jobs STAGE --config ...` (jobs/__main__.py)."""
