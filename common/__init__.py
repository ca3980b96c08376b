"""Helpers both daemons share that are not the wire format: TOML config, daemon lifecycle, durable files,
model construction. Depends on protocol/ only (for the schemas it validates against)."""
