"""Local training data, one module per dataset kind.

A kind is a spec (a msgspec Struct tagged on "kind", torch-free, so the agent's own process can read its config
and count samples) whose `open()` gives the `TrainingData` a task worker trains on. Adding a kind is one
module and one entry in `DataSpec`:

- `digits`: scikit-learn's digits, partitioned across devices (agent.data.digits);
- `imagefolder`: a class-per-folder image tree (agent.data.imagefolder);
- `synthetic`: seeded random images made on the device, for throughput work (agent.data.synthetic).

Decode with `msgspec.convert(obj, DataSpec)`.
"""

from agent.data.base import DataSpecBase, TrainingData
from agent.data.digits import DigitsData
from agent.data.imagefolder import ImageFolderData
from agent.data.synthetic import SyntheticData

DataSpec = DigitsData | ImageFolderData | SyntheticData

__all__ = ["DataSpec", "DataSpecBase", "DigitsData", "ImageFolderData", "SyntheticData", "TrainingData"]
