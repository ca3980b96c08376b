"""What GPUs a device has and how loaded they are: NVML (`nvml`), jetson-stats on Jetson (`jetson`), chosen at
run time by `probe`. Backend libraries are imported only inside the calls that need them."""
