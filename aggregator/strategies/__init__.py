"""Aggregation strategies, one module each, chosen per task by the config's `strategy` table (`name` picks one):

- `fedavg`: weighted FedAvg, streamed into running sums (aggregator.strategies.fedavg), the default;
- `fedprox`: FedAvg on the server, a proximal term `mu` on the devices' local loss (aggregator.strategies.fedprox);
- `trimmed_mean`: coordinate-wise trimmed mean over bounded windows (aggregator.strategies.trimmed_mean);
- `median`: coordinate-wise median over bounded windows (aggregator.strategies.median).

Adding a strategy is one module (a `StrategySpecBase` with a tag whose `build` makes a `Strategy`) and one entry
in `StrategySpec`.
"""

from aggregator.strategies.base import Strategy, StrategySpecBase
from aggregator.strategies.fedavg import FedAvgSpec, StreamingFedAvg
from aggregator.strategies.fedprox import FedProxSpec
from aggregator.strategies.median import MedianSpec
from aggregator.strategies.trimmed_mean import TrimmedMeanSpec

StrategySpec = FedAvgSpec | FedProxSpec | TrimmedMeanSpec | MedianSpec

__all__ = ["FedAvgSpec", "Strategy", "StrategySpec", "StrategySpecBase", "StreamingFedAvg"]
