"""The ZeroMQ KV transport (`zmq`, the default backend), run in prefill and decode workers.

`transport.py` owns the ROUTER socket and the interface; `sender.py` (with `outbox.py`)
queues and writes KV, `receiver.py` checks it against write grants and lands it in the pool.
The raw TCP data connection per peer: `data_path.py` (both sides), `data_links.py`,
`data_channel.py`, `data_records.py`. `pages.py` holds the pure page bookkeeping.
"""
