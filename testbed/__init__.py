"""Local test bed: a real Mosquitto broker (Docker or local binary) and the demo federation."""
