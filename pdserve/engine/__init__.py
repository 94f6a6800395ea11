"""The inference engine of a worker process: model, paged KV pool, scheduler, sampler."""
