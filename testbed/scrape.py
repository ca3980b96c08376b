"""Read a Prometheus endpoint over HTTP, as `curl` and a Prometheus server do."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Every sample of the endpoint: 'name' or 'name{label="value",...}' (labels sorted) -> value."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
