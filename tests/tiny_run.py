"""The settings of a tiny federated run (the tiny random Llama, a few synthetic examples, a step or
two), the base of every test that drives whole runs. They are `--set` items, so a test appends
what it changes and the last value of a key wins."""

TINY_RUN = [
    "model.name=tiny-random-llama",
    "model.dtype=float32",  # tests pin the numerics they compare; `auto` is bf16 on some CPUs
    "model.max_length=512",
    "data.synthetic_per_task=10",
    "data.min_client_size=8",
    "federation.num_clients=2",
    "federation.rounds=1",
    "federation.local_steps=2",
    "federation.batch_size=2",
    "hmole.num_experts=4",
    "eval.max_new_tokens=3",
    "eval.batch_size=16",
]
