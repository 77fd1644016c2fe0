"""Ray, once for every stage and task: the Ray Train runtime (trainer.py), the Ray Data
embedding pool (embedding.py), the sharded memory's build tasks and actors (shards.py)."""
