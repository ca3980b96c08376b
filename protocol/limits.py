"""Bounds on every number, string and list a v1 message may carry.

A value outside them is rejected when the message is decoded (ProtocolError), so nothing from the wire can reach
numpy, SQLite or the file system with a value they cannot hold (SQLite and numpy integers are 64-bit) or one
that makes a receiver allocate or loop without bound. The bounds are generous for real deployments; receivers
apply their own, tighter limits on top (e.g. the aggregator's `[transfers]` quotas).
"""

from __future__ import annotations

#: round numbers and global model versions (a round per second would last 68 years)
MAX_ROUND = 2**31 - 1
#: local training samples a device may declare or report for one task
MAX_SAMPLES = 10**9
#: tasks in one device profile or one schedule
MAX_TASKS = 64
#: local work a schedule may ask of one task
MAX_LOCAL_EPOCHS = 10_000
MAX_LOCAL_STEPS = 10**8
MAX_BATCH_SIZE = 65_536
#: how many times its configured batch size a plan may train a task's initial model at
MAX_BATCH_GROWTH = 64
#: rounds of a partial codec's warm-up (each doubles the share kept before it)
MAX_WARMUP_ROUNDS = 16
#: a task's training seed (its rounds' seeds, seed x (MAX_ROUND + 1) + round, stay below 2**41: a data loader
#: may multiply one by a million and still hold it in 64 bits)
MAX_TRAIN_SEED = 2**10 - 1

#: one chunked transfer: the whole payload, one chunk (MQTT's payload cap is 256 MiB), the number of chunks
MAX_TRANSFER_BYTES = 1 << 36
MAX_CHUNK_BYTES = 1 << 28
MAX_CHUNKS = 1 << 20

#: a state dict on the wire: tensors, dimensions per tensor, size of one dimension
MAX_TENSORS = 100_000
MAX_NDIM = 8
MAX_DIM = 2**31 - 1
MAX_TENSOR_NAME = 512

#: byte counts a device reports (memory sizes); well inside int64 and exact in float64
MAX_REPORTED_BYTES = 1 << 52
#: counts and sizes of hardware a device reports (CPUs, GPUs, SMs, clocks in MHz)
MAX_HARDWARE_COUNT = 1 << 20
MAX_GPUS = 64
#: timestamps (seconds since the epoch; about the year 5000)
MAX_TIMESTAMP = 1e11
#: free text (messages, reasons), short strings (versions, host names), paths
MAX_TEXT = 2000
MAX_SHORT_TEXT = 256
MAX_PATH = 4096
#: entries of a string map in a profile
MAX_MAP_ENTRIES = 64
#: entries of a metrics map (a plan event has two per task) and the length of a metric's name
MAX_METRICS = 256
MAX_METRIC_NAME = 128
