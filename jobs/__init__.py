"""Ray job entry points: `ray job submit -- python -m jobs.<stage> --config ...`."""
