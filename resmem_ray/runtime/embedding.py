"""The Ray Data embedding pool: `map_batches` over an actor pool, one model replica per
actor, loaded once (embed.num_actors, embed.cpus_per_actor, embed.gpus_per_actor).
Tasks pass their actor class; CPU-side preparation (decoding, tokenising) runs as its
own map step before this one, so it overlaps inference."""

from __future__ import annotations

from resmem_ray.schema import EmbedConfig


def map_with_model(ds, actor_cls, kwargs: dict, e: EmbedConfig):
    """`ds` mapped by `actor_cls(**kwargs)` on an actor pool; numpy batches of e.batch_size."""
    import ray.data

    # progress: bars on a terminal, elsewhere logged to Ray Data's log file (log.quiet_ray_data)
    return ds.map_batches(
        actor_cls, fn_constructor_kwargs={"num_threads": max(1, int(e.cpus_per_actor)), **kwargs},
        compute=ray.data.ActorPoolStrategy(size=e.num_actors), batch_size=e.batch_size,
        num_cpus=e.cpus_per_actor, num_gpus=e.gpus_per_actor or None, batch_format="numpy")
